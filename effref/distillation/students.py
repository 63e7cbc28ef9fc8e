"""A student cut from its teacher: keep some of the teacher's blocks, in order, with its embeddings and head.

Papers: Sanh, Debut, Chaumond, Wolf (2019), "DistilBERT, a distilled version of BERT", arXiv:1910.01108 — §3
(the student takes one layer out of two from the teacher, which gives distillation a good starting point);
Sajjad et al. (2023), "On the Effect of Dropping Layers of Pre-trained Transformer Models" (which layers to keep).
Implements: given our Llama teacher with blocks 0..L−1 and an increasing list ``keep`` of block indices, a Llama
with len(keep) blocks whose block i is a copy of teacher block keep[i], and copies of the embedding, the final
norm and the LM head, so the student computes exactly the teacher with the other blocks skipped (test).
Glossary: L teacher blocks · ``keep`` the kept block indices · the student shares the teacher's tokenizer.
Left out: choosing the blocks by a measured importance (``every_kth`` spreads them evenly, keeping the first and
the last), and width reduction.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

from effref.models.llama import Llama


def every_kth(n_layers: int, n_keep: int) -> list[int]:
    """``n_keep`` block indices spread evenly over 0..n_layers−1, the first and the last block included."""
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"n_keep={n_keep} must lie in [1, n_layers={n_layers}]")
    if n_keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})


def layer_dropped_student(teacher: Llama, keep: Sequence[int]) -> Llama:
    """A new Llama made of the teacher's blocks ``keep`` (increasing indices) and its embedding, norm and head."""
    if not isinstance(teacher, Llama):
        raise TypeError(f"teacher must be effref.models.llama.Llama, got {type(teacher).__name__}; convert a "
                        "transformers model with Llama.from_hf")
    n_layers = teacher.cfg.n_layers
    keep = list(keep)
    if not keep or any(not isinstance(i, int) or not 0 <= i < n_layers for i in keep) or keep != sorted(set(keep)):
        raise ValueError(f"keep={keep} must be a non-empty, increasing list of distinct block indices in "
                         f"[0, {n_layers - 1}]; e.g. every_kth({n_layers}, 6)")
    student = Llama(dataclasses.replace(teacher.cfg, n_layers=len(keep))).to(teacher.embed.weight.device)
    student.embed.load_state_dict(teacher.embed.state_dict())
    student.norm.load_state_dict(teacher.norm.state_dict())
    if not teacher.cfg.tie_embeddings:
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for position, index in enumerate(keep):
        block = copy.deepcopy(teacher.blocks[index])
        block.attn.layer = position  # its slot in the student's KV cache
        student.blocks[position] = block
    return student.to(teacher.embed.weight.dtype)
