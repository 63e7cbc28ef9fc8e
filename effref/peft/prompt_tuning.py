"""Soft prompts at the input: prompt tuning (free vectors) and P-Tuning (vectors from a prompt encoder).

Papers: Lester, Al-Rfou, Constant (2021), "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691 — §2 (prompt tuning), §3.2 (initialisation); Liu, Zheng, Du, Ding, Qian, Yang, Tang (2021),
"GPT Understands, Too", arXiv:2103.10385 — §3 (P-Tuning: h_i = MLP([LSTM→(h_0:i); LSTM←(h_i:m)])).
Implements: the frozen model reads [P; E(x)] instead of E(x): n virtual token embeddings P ∈ ℝ^{n×d} put in
front of the token embeddings. Prompt tuning trains P directly (initialised from random vocabulary rows,
from the embeddings of a text, or uniformly in [−0.5, 0.5]); P-Tuning computes P = f(P₀) with a prompt
encoder f — a bidirectional LSTM followed by a two-layer ReLU MLP as in the paper, or just the MLP — and
trains P₀ and f; after training f can be dropped by storing its output. The logits of the virtual
positions are discarded, so the wrapped model's outputs line up with its inputs.
Glossary: n ``n_virtual`` · d model width · P ``prompt()`` (n × d) · f ``encoder`` · P₀ ``embedding``.
Left out: P-Tuning's anchor tokens and prompts interleaved inside the input (here all virtual tokens come
          first), prompt ensembling, attention masks for padded batches (the bench has equal lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.models.calls import is_transformers_model
from effref.peft.core import freeze_base

INITS = ("vocab", "text", "random")
ENCODERS = ("mlp", "lstm")


@dataclass
class PromptTuningConfig:
    n_virtual: int = 20
    init: str = "vocab"  # "vocab": random vocabulary rows; "text": embeddings of init_ids; "random": U(-0.5, 0.5)
    init_ids: tuple[int, ...] = ()  # token ids for init="text" (cycled to n_virtual)
    encoder: str | None = None  # None: prompt tuning; "mlp" or "lstm": P-Tuning
    encoder_hidden: int | None = None  # width of the P-Tuning encoder (default: d)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_virtual, bool) or not isinstance(self.n_virtual, int) or self.n_virtual < 1:
            raise ValueError(f"n_virtual={self.n_virtual!r} must be a positive number of virtual tokens, e.g. 20")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not known; use one of {INITS}")
        if self.init == "text" and not self.init_ids:
            raise ValueError("init='text' needs init_ids (token ids of e.g. 'Which novel is this?')")
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r} is not known; use None (prompt tuning) or one of {ENCODERS}")


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding table of a transformers model or of our Llama."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    if isinstance(getattr(model, "embed", None), nn.Embedding):
        return model.embed
    raise TypeError(f"cannot find the input embeddings of {type(model).__name__}; pass a transformers causal LM "
                    "or effref.models.llama.Llama")


def forward_embeddings(model: nn.Module, embeds: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits (B, T or keep, V) of ``model`` for input embeddings (B, T, d) instead of token ids."""
    if is_transformers_model(model):
        return model(inputs_embeds=embeds, use_cache=False, logits_to_keep=logits_to_keep).logits
    if hasattr(model, "blocks") and hasattr(model, "rope_cos"):  # effref.models.llama.Llama, run block by block
        T = embeds.shape[1]
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, d_head)
        x = embeds
        for block in model.blocks:
            x = block(x, cos, sin)  # (B, T, d_model)
        x = model.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        return model.lm_head(x)
    raise TypeError(f"{type(model).__name__} cannot take input embeddings; use a transformers causal LM or our Llama")


class PromptEncoder(nn.Module):
    """P-Tuning's f: P₀ (n × d) → [bi-LSTM →] Linear → ReLU → Linear → P (n × d)."""

    def __init__(self, n: int, d: int, hidden: int, kind: str, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.embedding = nn.Parameter(torch.randn(n, d, **kw) * like.std())  # P₀
        self.lstm = nn.LSTM(d, hidden // 2, bidirectional=True, batch_first=True, **kw) if kind == "lstm" else None
        width = 2 * (hidden // 2) if self.lstm is not None else d
        self.mlp = nn.Sequential(nn.Linear(width, hidden, **kw), nn.ReLU(), nn.Linear(hidden, d, **kw))

    def forward(self) -> torch.Tensor:
        h = self.embedding[None]  # (1, n, d)
        if self.lstm is not None:
            h = self.lstm(h)[0]  # (1, n, 2·(hidden/2)): forward and backward states concatenated
        return self.mlp(h)[0]  # (n, d)


class SoftPromptModel(nn.Module):
    """A frozen causal LM that reads n virtual tokens before its input; returns logits of the real tokens."""

    supports_logits_to_keep = True

    def __init__(self, model: nn.Module, cfg: PromptTuningConfig, init_prompt: torch.Tensor | None = None):
        super().__init__()
        self.model, self.n_virtual = model, cfg.n_virtual
        embed = input_embeddings(model)
        table = embed.weight  # (V, d)
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.encoder is not None:
            self.encoder = PromptEncoder(cfg.n_virtual, table.shape[1], cfg.encoder_hidden or table.shape[1],
                                         cfg.encoder, table.detach())
            self.prompt_embedding = None
        else:
            if init_prompt is not None:  # e.g. hidden states of real tokens when the model starts mid-network
                if init_prompt.shape != (cfg.n_virtual, table.shape[1]):
                    raise ValueError(f"init_prompt has shape {tuple(init_prompt.shape)}; expected "
                                     f"(n_virtual, d) = {(cfg.n_virtual, table.shape[1])}")
                init = init_prompt
            elif cfg.init == "vocab":  # through the embedding module: Gemma's scales its rows by √d
                with torch.no_grad():
                    init = embed(torch.randint(0, table.shape[0], (cfg.n_virtual,), generator=g).to(table.device))
            elif cfg.init == "text":
                if not all(0 <= i < table.shape[0] for i in cfg.init_ids):
                    raise ValueError(f"init_ids={cfg.init_ids} must be token ids of the model's vocabulary "
                                     f"(0 … {table.shape[0] - 1})")
                with torch.no_grad():
                    init = embed(torch.tensor(cfg.init_ids).repeat(cfg.n_virtual)[:cfg.n_virtual].to(table.device))
            else:
                init = torch.rand(cfg.n_virtual, table.shape[1], generator=g, dtype=table.dtype) - 0.5
            self.prompt_embedding = nn.Parameter(init.detach().clone().to(table.device))  # P: (n, d)
            self.encoder = None

    def prompt(self) -> torch.Tensor:
        """The virtual token embeddings P, (n, d)."""
        return self.encoder() if self.encoder is not None else self.prompt_embedding

    def forward(self, input_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, **unused) -> torch.Tensor:
        embeds = input_embeddings(self.model)(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        prompt = self.prompt().to(embeds.dtype).expand(len(embeds), -1, -1)  # (B, n, d)
        logits = forward_embeddings(self.model, torch.cat([prompt, embeds], dim=1), logits_to_keep)
        return logits if logits_to_keep else logits[:, self.n_virtual:]  # (B, T or keep, V)


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig,
                        init_prompt: torch.Tensor | None = None) -> SoftPromptModel:
    """Freeze ``model`` and return it wrapped with a trainable soft prompt (prompt tuning or P-Tuning).

    ``init_prompt`` (n_virtual, d) overrides ``cfg.init`` for prompt tuning.
    """
    cfg = config_or_default(cfg, PromptTuningConfig, "PromptTuningConfig(n_virtual=20)")
    wrapped = SoftPromptModel(model, cfg, init_prompt)  # built first: a bad init_prompt leaves the model as it was
    freeze_base(model)
    return wrapped


def apply_p_tuning(model: nn.Module, n_virtual: int = 20, encoder: str = "lstm",
                   encoder_hidden: int | None = None) -> SoftPromptModel:
    """P-Tuning: ``apply_prompt_tuning`` with a prompt encoder ("lstm" as in the paper, or "mlp")."""
    return apply_prompt_tuning(model, PromptTuningConfig(n_virtual=n_virtual, encoder=encoder,
                                                         encoder_hidden=encoder_hidden))
