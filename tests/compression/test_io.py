"""Save/load of compressed models: bit-identical tensors, the same masks and shapes, the same outputs."""

import pytest
import torch

from effref.compression.io import load_compressed, same_tensors, save_compressed
from effref.lowrank.losparse import losparse_compress_model
from effref.lowrank.svd import svd_compress_model
from effref.lowrank.tensor_train import tt_compress_embedding
from effref.models import load_model
from effref.models.llama import Llama
from effref.pruning.llm_pruner import LLMPrunerConfig, llm_prune
from effref.pruning.masks import PruneConfig
from effref.pruning.sparsegpt import sparsegpt_prune_model

BATCHES = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _fresh(impl, seed=11):
    hf = load_model("tiny-llama", seed=seed).model
    return Llama.from_hf(hf) if impl == "effref" else hf


def _logits(model):
    with torch.no_grad():
        out = model(BATCHES)
    return out if isinstance(out, torch.Tensor) else out.logits


def _compress(kind, model):
    if kind == "sparsegpt-2:4":
        sparsegpt_prune_model(model, BATCHES, PruneConfig(nm="2:4"), progress=False)
    elif kind == "llm-pruner":
        llm_prune(model, BATCHES, LLMPrunerConfig(0.5, heads="group"), progress=False)
    elif kind == "svd+tt":
        svd_compress_model(model, 0.5, whiten=True, calib_batches=BATCHES, progress=False)
        tt_compress_embedding(model, (8, 8), (4,))
    else:  # losparse-element / losparse-column
        losparse_compress_model(model, 0.3, 0.1, kind.split("-")[1], calib_batches=BATCHES, progress=False)


@pytest.mark.parametrize("impl", ["hf", "effref"])
@pytest.mark.parametrize("kind", ["sparsegpt-2:4", "llm-pruner", "svd+tt", "losparse-element",
                                  "losparse-column"])
def test_round_trip_is_exact(tmp_path, impl, kind):
    model = _fresh(impl)
    _compress(kind, model)
    path = tmp_path / "model.safetensors"
    size = save_compressed(model, path)
    assert size == path.stat().st_size > 0
    loaded = load_compressed(_fresh(impl, seed=99), path)  # a skeleton with other weights
    assert same_tensors(model, loaded)
    zeros = {n: (p == 0) for n, p in model.state_dict().items()}
    assert all(torch.equal(zeros[n], p == 0) for n, p in loaded.state_dict().items())  # masks preserved
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in loaded.parameters()]
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_loading_refuses_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_compressed"):
        load_compressed(_fresh("hf"), tmp_path / "nothing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by save_compressed"):
        load_compressed(_fresh("hf"), tmp_path / "plain.safetensors")
