"""Medusa: extra decoding heads on a frozen model guess several future tokens; a tree verifies them at once.

Paper: Cai, Li, Geng, Peng, Lee, Chen, Dao (2024), "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads", arXiv:2401.10774 — §2.1.1 (heads), §2.1.2 (tree attention), §2.2.1 (Medusa-1:
training on a frozen backbone).
Implements: K heads on the backbone's last hidden state h_t (after the final norm); head k predicts the token
k + 1 steps ahead,  p_t^(k) = softmax(W_2 · (SiLU(W_1^(k) h_t + b^(k)) + h_t)),  a residual block whose W_1
starts at zero (so every head starts as the backbone's own next-token head). Medusa-1 training: backbone
frozen, loss Σ_k λ_k · CE(p_t^(k), x_{t+k+1}) with λ_k = 0.8^k on text. Decoding: the candidates form a
Cartesian tree (root = the pending token; under every node at depth k − 1 the top-s_k tokens of head k) that
the backbone verifies greedily in one pass (``decoding.tree_generate``): the output equals greedy decoding.
Glossary: h_t hidden state · K ``n_heads`` · W_1^(k), b^(k) ``residual[k-1]`` · W_2 the backbone's LM head
          (shared and frozen here) · λ_k loss weights · s_k ``branching[k-1]``.
Left out: training W_2 per head (the paper copies the LM head into each and trains it: 28M parameters per
          head for SmolLM2, too slow for a CPU quick run), Medusa-2 (joint training, self-distillation),
          typical acceptance (stochastic), and the paper's tuned sparse tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from effref.data import calibration_batches
from effref.inference.decoding import DecodeResult, TreeProposer, tree_generate
from effref.inference.drafts import run_blocks
from effref.models.llama import Llama, require_llama
from effref.runtime import progress_bar


class MedusaHeads(nn.Module):
    """K residual heads that read the backbone's hidden state and reuse its (frozen) LM head."""

    def __init__(self, d_model: int, n_heads: int = 3):
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads={n_heads} must be >= 1")
        self.residual = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_heads))
        for layer in self.residual:  # W_1 = 0: each head starts as the backbone's next-token head
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        """Logits (K, ..., V) of the K heads for hidden states (..., d_model)."""
        weight = lm_head.weight.detach()  # W_2, frozen: no gradient flows into the backbone
        return torch.stack([F.linear(hidden + F.silu(res(hidden)), weight) for res in self.residual])


@torch.no_grad()
def hidden_states(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """The backbone's final (normed) hidden states for ids (B, T): (B, T, d_model), without the LM head."""
    return model.norm(run_blocks(model, model.embed(ids), range(model.cfg.n_layers)))


def train_medusa_heads(model: Llama, heads: MedusaHeads, ids: torch.Tensor, steps: int, seq_len: int = 128,
                       n_windows: int = 8, positions_per_step: int = 64, lr: float = 1e-3,
                       seed: int = 0) -> list[float]:
    """Medusa-1: train ``heads`` on token stream ``ids`` (N,) with the backbone frozen; returns the losses."""
    require_llama(model, "model")
    if steps < 1 or positions_per_step < 1:
        raise ValueError(f"steps={steps}, positions_per_step={positions_per_step}: need both >= 1")
    K = len(heads.residual)
    windows = calibration_batches(ids, n_windows, seq_len, seed=seed)  # (n_windows, seq_len)
    hidden = hidden_states(model, windows)[:, :seq_len - K - 1].reshape(-1, model.cfg.d_model)  # (M, d)
    targets = torch.stack([windows[:, k + 2:seq_len - K + k + 1].reshape(-1) for k in range(K)])  # (K, M)
    weights = torch.tensor([0.8 ** (k + 1) for k in range(K)])  # λ_k
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    generator, losses = torch.Generator().manual_seed(seed), []
    for _ in progress_bar(range(steps), desc="Medusa heads", leave=False):
        pick = torch.randint(0, len(hidden), (positions_per_step,), generator=generator)  # (P,)
        logits = heads(hidden[pick], model.lm_head)  # (K, P, V)
        per_head = torch.stack([F.cross_entropy(logits[k].float(), targets[k, pick]) for k in range(K)])
        loss = (weights * per_head).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


class MedusaProposer(TreeProposer):
    """The Cartesian candidate tree: top-s_k tokens of head k under every node of depth k − 1."""

    def __init__(self, heads: MedusaHeads, lm_head: nn.Linear, branching: Sequence[int]):
        if not 1 <= len(branching) <= len(heads.residual) or any(s < 1 for s in branching):
            raise ValueError(f"branching={tuple(branching)}: need 1..{len(heads.residual)} entries (one per "
                             "head used), each >= 1")
        self.heads, self.lm_head, self.branching = heads, lm_head, tuple(branching)
        self.max_nodes, width = 1, 1
        for s in self.branching:
            width *= s
            self.max_nodes += width

    @torch.no_grad()
    def propose(self, history: list[int], hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        logits = self.heads(hidden, self.lm_head)  # (K, V): head k guesses the token k + 1 after the root's
        tokens, parents, level = [history[-1]], [-1], [0]
        for k, s in enumerate(self.branching):
            top = logits[k].topk(s).indices.tolist()  # the same s candidates under every node of this depth
            children = []
            for node in level:
                for token in top:
                    tokens.append(token)
                    parents.append(node)
                    children.append(len(tokens) - 1)
            level = children
        return tokens, parents


def medusa_generate(model: Llama, heads: MedusaHeads, prompt: torch.Tensor, max_new_tokens: int,
                    branching: Sequence[int] = (3, 2), eos_id: int | None = None) -> DecodeResult:
    """Greedy decoding of ``model`` with Medusa candidates; the output equals ``model.generate``'s."""
    return tree_generate(model, prompt, max_new_tokens, MedusaProposer(heads, model.lm_head, branching), eos_id)
