"""Mamba against transformers' MambaForCausalLM (its PyTorch path) on the same weights, and against itself.

transformers runs Mamba through the fused ``mamba_ssm`` / ``causal_conv1d`` kernels when they are installed and the
inputs are on a device they support; on CPU (and without those packages) every wrapped function falls back to its
PyTorch reference, the "slow" path compared here. ``use_mambapy=False`` keeps the optional mambapy scan out, and
``use_associative_scan`` only acts under torch.compile.
"""

import importlib.util
import math

import pytest
import torch
import transformers
from transformers.models.mamba import modeling_mamba

from effref.alternatives.mamba import (Mamba, MambaConfig, MambaState, selective_scan_parallel,
                                       selective_scan_sequential)

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()  # the "falling back to the PyTorch implementation" notes


def hf_mamba(seed: int = 0, **overrides) -> transformers.MambaForCausalLM:
    """A tiny random MambaForCausalLM, every parameter perturbed so that none keeps its special initial value."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                                expand=2, conv_kernel=4, use_mambapy=False), **overrides})
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


IDS = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))


def test_transformers_runs_its_pytorch_path_here():
    # the comparison below is against the reference path only when the CUDA packages are absent (or unused on CPU)
    assert IDS.device.type == "cpu" or importlib.util.find_spec("mamba_ssm") is None
    assert hf_mamba().config.use_mambapy is False


def random_ssm_inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, D, N = 2, 6, 4
    u, delta = torch.randn(batch, T, D, generator=g), torch.rand(batch, T, D, generator=g) * 0.5
    A = -torch.rand(D, N, generator=g) * 2
    B, C = torch.randn(batch, T, N, generator=g), torch.randn(batch, T, N, generator=g)
    Dskip = torch.randn(D, generator=g)
    return u, delta, A, B, C, Dskip


@pytest.mark.parametrize("T", [1, 7, 32])
def test_both_selective_scans_equal_transformers_reference_scan(T):
    u, delta, A, B, C, Dskip = random_ssm_inputs(T)
    # transformers' layout: (batch, D, T) for u and Δ, (batch, N, T) for B and C
    ref_y, ref_h = modeling_mamba.mamba_selective_scan(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=Dskip,
        return_last_state=True)
    for scan in (selective_scan_sequential, selective_scan_parallel):
        y, h = scan(u, delta, A, B, C, Dskip)
        torch.testing.assert_close(y, ref_y.transpose(1, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)


def test_a_scan_continued_from_its_state_equals_one_scan():
    u, delta, A, B, C, Dskip = random_ssm_inputs(20, seed=3)
    whole, h_whole = selective_scan_parallel(u, delta, A, B, C, Dskip)
    first, h = selective_scan_sequential(u[:, :8], delta[:, :8], A, B[:, :8], C[:, :8], Dskip)
    second, h = selective_scan_parallel(u[:, 8:], delta[:, 8:], A, B[:, 8:], C[:, 8:], Dskip, h0=h)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_whole, rtol=1e-5, atol=1e-5)


def test_block_equals_transformers_block():
    hf = hf_mamba()
    ours = Mamba.from_hf(hf)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        for ours_block, hf_block in zip(ours.layers, hf.backbone.layers):
            torch.testing.assert_close(ours_block(x), hf_block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", ["parallel", "sequential"])
@pytest.mark.parametrize("overrides", [{}, dict(conv_kernel=2, use_bias=True, tie_word_embeddings=False,
                                                time_step_rank=3, state_size=16)], ids=["default", "variant"])
def test_model_logits_equal_transformers(scan, overrides):
    hf = hf_mamba(**overrides)
    ours = Mamba.from_hf(hf)
    ours.cfg.scan = scan
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=1e-5, atol=1e-5)


def test_dt_rank_defaults_to_a_sixteenth_of_the_width_rounded_up():
    assert MambaConfig(d_model=33).dt_rank == math.ceil(33 / 16) == hf_mamba(hidden_size=33).config.time_step_rank


@pytest.mark.parametrize("split", [[21], [5] + [1] * 16, [1] * 21, [3, 10, 1, 7]], ids=["whole", "prefill+steps",
                                                                                      "steps", "chunks"])
def test_stepping_with_the_state_equals_the_full_forward(split):
    ours = Mamba.from_hf(hf_mamba())
    with torch.no_grad():
        full = ours(IDS)
        state, outs, start = ours.new_state(2), [], 0
        for n in split:
            outs.append(ours(IDS[:, start:start + n], state))
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert state.length == IDS.shape[1]


def test_cached_steps_equal_transformers_cached_steps():
    # transformers' own recurrent path (conv state + ssm state in its cache) token by token
    hf = hf_mamba()
    ours = Mamba.from_hf(hf)
    with torch.no_grad():
        out = hf(IDS[:, :6], use_cache=True)
        cache, hf_steps = out.cache, [out.logits]
        state = ours.new_state(2)
        our_steps = [ours(IDS[:, :6], state)]
        for t in range(6, 12):
            out = hf(IDS[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            hf_steps.append(out.logits)
            our_steps.append(ours(IDS[:, t:t + 1], state))
    torch.testing.assert_close(torch.cat(our_steps, 1), torch.cat(hf_steps, 1), rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_transformers_generate():
    hf = hf_mamba(seed=2)
    ours = Mamba.from_hf(hf)
    prompt = IDS[:, :7]
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=15, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 15), expected)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    ours = Mamba.from_hf(hf_mamba())
    prompt = IDS[:, :4]
    one = ours.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    two = ours.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, two)
    assert torch.equal(ours.generate(prompt, 10, temperature=0.7, top_k=1), ours.generate(prompt, 10))


def test_the_state_does_not_grow_with_the_sequence():
    cfg = MambaConfig(vocab_size=64, d_model=32, n_layers=3, d_state=8)
    model = Mamba(cfg).eval()
    state = model.new_state(2)
    expected = 4 * cfg.n_layers * 2 * cfg.d_inner * (cfg.d_conv - 1 + cfg.d_state)  # float32 numbers
    sizes = []
    with torch.no_grad():
        for n in (1, 10, 100):
            model(torch.randint(0, 64, (2, n)), state)
            sizes.append(state.nbytes())
    assert sizes == [expected] * 3


def test_save_and_load_are_exact(tmp_path):
    model = Mamba(MambaConfig(vocab_size=64, d_model=32, n_layers=2, d_state=8, scan="sequential")).eval()
    model.save(tmp_path / "mamba.safetensors")
    loaded = Mamba.load(tmp_path / "mamba.safetensors")
    assert loaded.cfg == model.cfg
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_trains_a_little():
    torch.manual_seed(0)
    model = Mamba(MambaConfig(vocab_size=16, d_model=32, n_layers=2, d_state=8))
    data = torch.arange(16).repeat(4, 3)  # (4, 48): a counting sequence, predictable from one token back
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_state=0), r"d_state=0 must be a positive integer \(Mamba uses 16\)"),
    (dict(d_conv=0), r"d_conv=0 must be a positive integer \(Mamba uses 4\)"),
    (dict(expand=0), r"expand=0 must be a positive integer \(Mamba uses 2\)"),
    (dict(expand=1.5), r"expand=1.5 must be a positive integer"),
    (dict(dt_rank=0), r"dt_rank=0 must be a positive integer \(None: ⌈d_model / 16⌉\)"),
    (dict(scan="fast"), r"scan='fast' is not known; use one of \('parallel', 'sequential'\)"),
    (dict(dt_min=0.5, dt_max=0.1), "need 0 < dt_min <= dt_max"),
])
def test_bad_configs_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MambaConfig(**kwargs)


def test_bad_calls_are_refused_by_name(tmp_path):
    model = Mamba(MambaConfig(vocab_size=64, d_model=32, n_layers=1, d_state=4))
    with pytest.raises(ValueError, match=r"state.batch_size=3 but input_ids has B=2; create the state with"):
        model(IDS, model.new_state(3))
    with pytest.raises(ValueError, match=r"outside this model's vocabulary 0..63"):
        model(IDS + 60)
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids of shape \(B, T\)"):
        model(IDS[0])
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        MambaState(model.cfg, 0)
    with pytest.raises(ValueError, match="hf_model must be a transformers MambaForCausalLM, got RwkvForCausalLM"):
        Mamba.from_hf(transformers.RwkvForCausalLM(transformers.RwkvConfig(vocab_size=64, hidden_size=32,
                                                                           num_hidden_layers=2)))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no effref model, not a Mamba"):
        Mamba.load(tmp_path / "other.safetensors")
