"""Recurrent Memory Transformer: memory tokens carry a summary of each segment into the next.

Paper: Bulatov, Kuratov, Burtsev (2022), "Recurrent Memory Transformer", NeurIPS 2022, arXiv:2207.06881 — §3
(memory tokens; the decoder-only layout with read and write memory; training by backpropagation through time).
Implements, around an unchanged decoder (our Llama): a long input is cut into segments of L tokens; segment τ
runs as one ordinary causal sequence
  H̃_τ = [H^mem_τ ∘ E(x_τ) ∘ H^mem_τ]   (m read tokens, the L segment embeddings, m write tokens),
and of the output [H^read ∘ H_τ ∘ H^write] the segment's states give its logits while the write states become
the next memory, H^mem_{τ+1} = H^write_τ. The read copy lets every segment token see the memory; the write copy,
placed last, sees the whole segment. H^mem_0 is learned; gradients flow through the memory into earlier
segments (backpropagation through time), so the model learns what to write.
Glossary: m ``num_memory`` · L ``segment_len`` · H^mem memory states (B, m, d_model) · E token embedding · τ
          segment index.
Left out: truncated backpropagation through time (gradients flow through all segments), the encoder-only
          variant (one memory block read and written in place), and the curriculum on the number of segments.
"""

from __future__ import annotations

import torch
from torch import nn

from effref.models.llama import Llama, require_llama


class RecurrentMemoryTransformer(nn.Module):
    """Our Llama reading a long input segment by segment, with ``num_memory`` learned memory tokens."""

    def __init__(self, model: Llama, num_memory: int, segment_len: int):
        super().__init__()
        require_llama(model, "model")
        for name, value in (("num_memory", num_memory), ("segment_len", segment_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if 2 * num_memory + segment_len > model.cfg.max_seq_len:
            raise ValueError(f"2 · num_memory={num_memory} + segment_len={segment_len} exceed the model's "
                             f"max_seq_len={model.cfg.max_seq_len}; use fewer memory tokens or shorter segments")
        self.model, self.num_memory, self.segment_len = model, num_memory, segment_len
        self.memory = nn.Parameter(torch.randn(num_memory, model.cfg.d_model) * 0.02)  # H^mem_0

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        return self.memory.expand(batch_size, -1, -1)  # (B, m, d_model)

    def step(self, segment: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, vocab) of one segment (B, L) read with ``memory`` (B, m, d_model), and the next memory."""
        m, L, model = self.num_memory, segment.shape[1], self.model
        x = torch.cat([memory, model.embed(segment), memory], dim=1)  # (B, m + L + m, d_model): read, tokens, write
        cos, sin = model.rope_cos[:x.shape[1]], model.rope_sin[:x.shape[1]]  # (m + L + m, d_head)
        for block in model.blocks:
            x = block(x, cos, sin)  # one causal pass over the whole layout
        return model.lm_head(model.norm(x[:, m:m + L])), x[:, m + L:]  # (B, L, vocab), (B, m, d_model) H^write

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of a long input (B, T), read in segments of ``segment_len`` tokens."""
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must be (B, T) with T >= 1, got {tuple(ids.shape)}")
        memory, logits = self.initial_memory(ids.shape[0]), []
        for segment in ids.split(self.segment_len, dim=1):
            out, memory = self.step(segment, memory)
            logits.append(out)
        return torch.cat(logits, dim=1)
