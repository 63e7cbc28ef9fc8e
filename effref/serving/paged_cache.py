"""A paged KV cache for our LLaMA and a forward pass over a ragged batch of sequences that reads and writes it.

Paper: Kwon et al. (2023), "Efficient Memory Management for Large Language Model Serving with PagedAttention",
arXiv:2309.06180 — §4.1–4.3; the ragged ("selective") batching of Yu et al. (2022), "Orca: A Distributed Serving
System for Transformer-Based Generative Models", OSDI '22 — §4.2.
Implements: ``PagedKVCache`` keeps, per layer, key and value pools (num_blocks, b, n_kv_heads, d_head).
``paged_forward`` runs ``effref.models.llama.Llama``'s own modules on the new tokens of several sequences at
once, concatenated without padding into one (N, d_model) row set: every token-wise operation (norms,
projections, MLP, LM head) sees N tokens; only attention is per sequence. Each token's rotated key/value is
written to its slot; then a sequence with one new token (decode) joins a batched ``paged_attention`` call,
and a sequence with several (a prompt, or a recomputation after preemption) attends causally over its
gathered cache with SDPA. The slot addresses of every cached token are computed once per step. Logits are
computed only for each sequence's last new token, or for the rows asked for (speculative verification).
Glossary: N new tokens in the step (all sequences) · S sequences · slot = block · b + offset · pos token
          position (RoPE angle index) · L_i cached + new tokens of sequence i.
Left out: CUDA graphs, chunked prefill, a fused write-and-attend kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effref.models.llama import Llama, apply_rope
from effref.serving.paged_attention import attend_slots, block_slots


class PagedKVCache:
    """Key and value block pools for every layer of a model: (n_layers, num_blocks, b, n_kv_heads, d_head)."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, d_head: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 num_cpu_blocks: int = 0):
        shape = (n_layers, num_blocks, block_size, n_kv_heads, d_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        cpu_shape = (n_layers, num_cpu_blocks, block_size, n_kv_heads, d_head)  # swap space in host memory
        self.k_cpu, self.v_cpu = torch.zeros(cpu_shape, dtype=dtype), torch.zeros(cpu_shape, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size

    @classmethod
    def for_model(cls, model: Llama, num_blocks: int, block_size: int = 16, num_cpu_blocks: int = 0) -> PagedKVCache:
        w = model.embed.weight
        return cls(model.cfg.n_layers, num_blocks, block_size, model.cfg.n_kv_heads, model.cfg.d_head,
                   dtype=w.dtype, device=w.device, num_cpu_blocks=num_cpu_blocks)

    @property
    def bytes_per_token(self) -> int:
        """Memory of one token slot over all layers, keys and values."""
        n_layers, _, _, n_kv, d = self.k.shape
        return 2 * n_layers * n_kv * d * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values (N, n_kv_heads, d_head) at flat slots (N,)."""
        self.k[layer].view(-1, *self.k.shape[3:])[slots] = k  # pool seen as (num_blocks · b, n_kv, d)
        self.v[layer].view(-1, *self.v.shape[3:])[slots] = v

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: give every destination block the contents of its source, in all layers."""
        if pairs:
            src, dst = zip(*pairs)
            self.k[:, list(dst)] = self.k[:, list(src)]
            self.v[:, list(dst)] = self.v[:, list(src)]

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (device, CPU) block pairs out to host memory, then (CPU, device) pairs back in."""
        if swap_out:
            dev, cpu = (list(x) for x in zip(*swap_out))
            self.k_cpu[:, cpu], self.v_cpu[:, cpu] = self.k[:, dev].cpu(), self.v[:, dev].cpu()
        if swap_in:
            cpu, dev = (list(x) for x in zip(*swap_in))
            self.k[:, dev], self.v[:, dev] = self.k_cpu[:, cpu].to(self.k.device), self.v_cpu[:, cpu].to(self.v.device)


@dataclass
class RaggedBatch:
    """The new tokens of S sequences for one step, flattened; each sequence's tokens are contiguous."""

    input_ids: torch.Tensor  # (N,) token ids
    positions: torch.Tensor  # (N,) positions in their sequences
    slots: torch.Tensor  # (N,) flat cache addresses to write
    n_new: list[int]  # new tokens per sequence (sums to N)
    block_tables: torch.Tensor  # (S, max_blocks) int32, -1 past each table's end
    context_lens: torch.Tensor  # (S,) int32 tokens cached after this step (old + new)
    context_slots: torch.Tensor  # (S, L) flat addresses of every cached token, shared by all layers
    valid: torch.Tensor  # (S, L) which of those are real

    def __post_init__(self) -> None:  # the per-step index work, done once rather than in every layer
        ends = torch.tensor(self.n_new).cumsum(0).tolist()  # one past each sequence's last new token
        self.last = torch.tensor(ends, device=self.input_ids.device) - 1  # (S,) rows whose logits we need
        self.decode = [i for i, n in enumerate(self.n_new) if n == 1]
        self.decode_rows = self.last[self.decode]  # (S_decode,)
        self.decode_slots, self.decode_valid = self.context_slots[self.decode], self.valid[self.decode]
        lens = self.context_lens.tolist()
        self.prefills = [(slice(e - n, e), self.context_slots[i, :lens[i]],  # rows, cached-token addresses,
                          torch.ones(n, lens[i], dtype=torch.bool, device=self.input_ids.device)
                          .tril(diagonal=lens[i] - n))  # causal mask: new query j sees keys <= L - n + j
                         for i, (n, e) in enumerate(zip(self.n_new, ends)) if n > 1]

    @classmethod
    def build(cls, tables: list, starts: list[int], device: torch.device | str | None = None) -> RaggedBatch:
        """From block tables (``BlockTable``) whose tokens from ``starts[i]`` on still need computing."""
        ids, pos, slots = [], [], []
        for table, start in zip(tables, starts):
            ids += table.tokens[start:]
            pos += range(start, table.num_tokens)
            slots += [table.slot(p) for p in range(start, table.num_tokens)]
        width = max(len(t.blocks) for t in tables)
        block_tables = torch.tensor([t.blocks + [-1] * (width - len(t.blocks)) for t in tables],
                                    dtype=torch.int32, device=device)
        context_lens = torch.tensor([t.num_tokens for t in tables], dtype=torch.int32, device=device)
        as_long = {"dtype": torch.long, "device": device}
        return cls(torch.tensor(ids, **as_long), torch.tensor(pos, **as_long), torch.tensor(slots, **as_long),
                   [t.num_tokens - s for t, s in zip(tables, starts)], block_tables, context_lens,
                   *block_slots(block_tables, context_lens, tables[0].block_size))


def _attend(q: torch.Tensor, cache: PagedKVCache, layer: int, batch: RaggedBatch) -> torch.Tensor:
    """Attention of the N new queries (N, n_heads, d_head) over their sequences' cached keys/values."""
    k_pool, v_pool = cache.k[layer], cache.v[layer]  # (num_blocks, b, n_kv, d)
    out = torch.empty_like(q)  # (N, n_heads, d)
    if batch.decode:  # one query per sequence: the batched paged attention
        out[batch.decode_rows] = attend_slots(q[batch.decode_rows], k_pool, v_pool, batch.decode_slots,
                                              batch.decode_valid)
    for rows, slots, mask in batch.prefills:  # several new tokens: causal attention over the gathered cache
        k = k_pool.flatten(0, 1)[slots].transpose(0, 1)  # (n_kv, L, d)
        v = v_pool.flatten(0, 1)[slots].transpose(0, 1)  # (n_kv, L, d)
        out[rows] = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k, v, attn_mask=mask,
                                                   enable_gqa=True).transpose(0, 1)  # (n, n_heads, d)
    return out


@torch.inference_mode()
def paged_forward(model: Llama, cache: PagedKVCache, batch: RaggedBatch,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (S, vocab) of each sequence's last new token; writes every new token's keys/values to ``cache``.

    ``rows`` (R,), indices into the N new tokens, asks for those tokens' logits (R, vocab) instead (speculative
    verification needs every drafted position).
    """
    if int(batch.positions.max()) >= model.cfg.max_seq_len:
        raise ValueError(f"position {int(batch.positions.max())} exceeds the model's max_seq_len="
                         f"{model.cfg.max_seq_len}")
    cfg, N = model.cfg, len(batch.input_ids)
    cos, sin = model.rope_cos[batch.positions], model.rope_sin[batch.positions]  # (N, d_head) each
    x = model.embed(batch.input_ids)  # (N, d_model)
    for layer, block in enumerate(model.blocks):
        attn, h = block.attn, block.attn_norm(x)  # (N, d_model)
        q = attn.q_proj(h).view(N, cfg.n_heads, cfg.d_head)  # (N, n_heads, d)
        k = attn.k_proj(h).view(N, cfg.n_kv_heads, cfg.d_head)  # (N, n_kv, d)
        v = attn.v_proj(h).view(N, cfg.n_kv_heads, cfg.d_head)  # (N, n_kv, d)
        q = apply_rope(q.transpose(0, 1), cos, sin).transpose(0, 1)  # heads first for apply_rope's (.., T, d)
        k = apply_rope(k.transpose(0, 1), cos, sin).transpose(0, 1)
        cache.write(layer, batch.slots, k, v)
        y = _attend(q, cache, layer, batch)  # (N, n_heads, d)
        x = x + attn.o_proj(y.reshape(N, cfg.n_heads * cfg.d_head))  # same residual stream as Block.forward
        x = x + block.mlp(block.mlp_norm(x))  # (N, d_model)
    return model.lm_head(model.norm(x[batch.last if rows is None else rows]))  # (S or R, vocab)
