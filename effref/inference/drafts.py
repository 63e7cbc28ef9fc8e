"""Draft models that exist offline: the target itself with most of its blocks skipped.

Papers: layer-skipping self-drafts as in Zhang et al. (2023), "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding", arXiv:2309.08168; the affine "tuned lens" of Belrose et al.
(2023), "Eliciting Latent Predictions from Transformers with the Tuned Lens", arXiv:2303.08112.
Implements: a shallow copy of our Llama that runs only the blocks in ``keep`` (default: the first k), then the
final RMSNorm and LM head, sharing every weight with the target (it costs no memory but its own KV cache);
optionally an affine lens  h_L ≈ A h_keep + b  in front of the final norm, fitted in closed form by ridge
regression on calibration text:  [A; b] = (XᵀX + λI)⁻¹ XᵀY  with X the draft's last hidden states (plus a
column of ones) and Y the target's last hidden states, both before the final norm.
Glossary: k kept blocks · h_keep draft residual stream · h_L target residual stream · λ ``ridge`` (relative to
          the mean of diag XᵀX) · N calibration tokens.
Left out: Draft & Verify's Bayesian search for which layers to skip (the chapter compares a few choices),
          and training the draft (distillation would raise acceptance; it is not offline-cheap).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from effref.models.llama import Block, Llama, require_llama


def _as_layers(model: Llama, keep: int | Sequence[int]) -> list[int]:
    n = model.cfg.n_layers
    layers = list(range(keep)) if isinstance(keep, int) else [int(i) for i in keep]
    if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < n:
        raise ValueError(f"keep={keep!r}: need k in 1..{n} or strictly increasing block indices in 0..{n - 1}")
    return layers


def _renumbered(block: Block, layer: int) -> Block:
    """The same block (same weights) writing its keys/values to cache layer ``layer``."""
    clone, attn = copy.copy(block), copy.copy(block.attn)
    clone._modules = dict(block._modules)  # a new table, so swapping attn leaves the target's block alone
    attn.layer = layer
    clone._modules["attn"] = attn
    return clone


def layer_skip_draft(model: Llama, keep: int | Sequence[int], lens: nn.Module | None = None) -> Llama:
    """A draft that runs ``keep`` (k, or block indices) of ``model``'s blocks, then ``lens``, norm and head."""
    require_llama(model, "model")
    layers = _as_layers(model, keep)
    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # the target keeps its own blocks / norm
    draft._modules["blocks"] = nn.ModuleList(_renumbered(model.blocks[i], j) for j, i in enumerate(layers))
    if lens is not None:
        draft._modules["norm"] = nn.Sequential(lens, model.norm)
    draft.cfg = dataclasses.replace(model.cfg, n_layers=len(layers))
    draft.kept_layers = layers
    return draft


def run_blocks(model: Llama, x: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """The residual stream (B, T, d_model) after running ``layers`` of ``model`` on x, without a cache."""
    cos, sin = model.rope_cos[:x.shape[1]], model.rope_sin[:x.shape[1]]  # (T, d_head) each
    for i in layers:
        x = model.blocks[i](x, cos, sin)
    return x


def _ridge_lens(h: torch.Tensor, y: torch.Tensor, ridge: float) -> nn.Linear:
    """The affine map h -> y (both (..., d)) minimising ‖[h 1][A b]ᵀ − y‖² + λ‖·‖², as an nn.Linear."""
    d = h.shape[-1]
    x, y = h.reshape(-1, d).double(), y.reshape(-1, d).double()  # (N, d) draft and target residuals
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)  # (N, d + 1)
    gram = x.T @ x  # (d + 1, d + 1)
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram, x.T @ y)  # (d + 1, d): [Aᵀ; b]
    lens = nn.Linear(d, d).to(device=h.device, dtype=h.dtype)
    lens.weight.copy_(solution[:d].T)
    lens.bias.copy_(solution[d])
    return lens


def _check_calibration(model: Llama, calib_ids: torch.Tensor, ridge: float) -> None:
    if calib_ids.ndim != 2 or calib_ids.numel() <= model.cfg.d_model:
        raise ValueError(f"calib_ids {tuple(calib_ids.shape)}: need (B, T) with more than d_model="
                         f"{model.cfg.d_model} tokens (a lens has d_model + 1 unknowns per output)")
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be >= 0")


@torch.no_grad()
def fit_lens(model: Llama, keep: int | Sequence[int], calib_ids: torch.Tensor, ridge: float = 1e-2) -> nn.Linear:
    """Fit the affine lens of a ``keep`` draft on ``calib_ids`` (B, T): ridge regression of h_L on h_keep."""
    _check_calibration(model, calib_ids, ridge)
    layers = _as_layers(model, keep)
    h = run_blocks(model, model.embed(calib_ids), layers)  # (B, T, d) the draft's residual stream
    if layers == list(range(len(layers))):  # a prefix of the blocks: the target continues from h
        y = run_blocks(model, h, range(len(layers), model.cfg.n_layers))
    else:
        y = run_blocks(model, model.embed(calib_ids), range(model.cfg.n_layers))
    return _ridge_lens(h, y, ridge)


@torch.no_grad()
def fit_prefix_lenses(model: Llama, ks: Sequence[int], calib_ids: torch.Tensor,
                      ridge: float = 1e-2) -> dict[int, nn.Linear]:
    """``fit_lens`` for the drafts "first k blocks", every k in ``ks``, from one forward pass."""
    _check_calibration(model, calib_ids, ridge)
    for k in ks:
        _as_layers(model, k)
    x, seen = model.embed(calib_ids), {}
    for i in range(model.cfg.n_layers):
        x = run_blocks(model, x, [i])  # (B, T, d)
        if i + 1 in ks:
            seen[i + 1] = x
    return {k: _ridge_lens(seen[k], x, ridge) for k in ks}
