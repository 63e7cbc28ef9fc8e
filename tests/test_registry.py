"""The model registry: names, sources and implementations, with clear errors for bad requests."""

import pytest
import torch

from effref import assets
from effref.models import MODELS, load_model


def test_tiny_model_is_random_llama_and_labelled_so():
    model, tokenizer, source = load_model("tiny-llama")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer is None
    assert source.origin == "random" and not source.prequantized
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention


def test_same_seed_same_weights_and_ours_equals_transformers():
    hf = load_model("tiny-llama", seed=3).model
    ours = load_model("tiny-llama", impl="effref", seed=3).model
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="gpt-5"), "name='gpt-5' is not known"),
    (dict(name="tiny-llama", impl="jax"), "impl='jax'"),
    (dict(name="smollm2-135m", source="ftp"), "source='ftp'"),
    (dict(name="smollm2-360m", source="offline"), "no offline source"),
])
def test_bad_requests_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(**kwargs)


def test_missing_offline_asset_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFREF_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="python -m effref.assets fetch"):
        load_model("smollm2-135m", source="offline")


def test_auto_source_offline_without_the_asset_says_how_to_fetch_it(tmp_path, monkeypatch):
    # auto falls back to the hub when the offline copy is missing; with no network that used to surface as
    # transformers' "couldn't connect" instead of the promised AssetMissingError
    monkeypatch.setenv("EFFREF_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: nothing to fall back on
    monkeypatch.delenv("EFFREF_MODEL_SOURCE", raising=False)
    with pytest.raises(assets.AssetMissingError, match=r"not fetched and the hub .* could not be reached.*"
                                                        r"python -m effref.assets fetch smollm2-135m"):
        load_model("smollm2-135m")


@pytest.mark.slow
def test_offline_smollm2_loads_with_its_provenance():
    if not assets.is_available("smollm2-135m"):
        pytest.skip("SmolLM2 not fetched: run python -m effref.assets fetch")
    model, tokenizer, source = load_model("smollm2-135m", source="offline")
    assert source.prequantized and "Q4_1" in source.describe()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.decode(tokenizer.encode("Emma Woodhouse")) == "Emma Woodhouse"
    assert set(MODELS) >= {"smollm2-135m", "tiny-llama"}
