"""RWKV-4 against transformers' RwkvForCausalLM (its CPU path) on the same weights, and its two forms against each
other and against the WKV sum evaluated term by term in float64."""

import pytest
import torch
import transformers
from transformers.models.rwkv import modeling_rwkv

from effref.alternatives.rwkv import RWKV, RWKVConfig, RWKVState, wkv_parallel, wkv_recurrent

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()


def hf_rwkv(seed: int = 0, **overrides) -> transformers.RwkvForCausalLM:
    torch.manual_seed(seed)
    config = transformers.RwkvConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=4,
                                               attention_hidden_size=32, intermediate_size=48, context_length=64,
                                               rescale_every=0), **overrides})
    model = transformers.RwkvForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


IDS = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))


def wkv_by_definition(w, u, k, v):
    """wkv_t = (Σ_{i<t} e^{−(t−1−i)w + k_i} v_i + e^{u + k_t} v_t) / (same without v), in float64, no tricks."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    out = torch.empty_like(k)
    for t in range(k.shape[1]):
        weights = [torch.exp(-(t - 1 - i) * w + k[:, i]) for i in range(t)] + [torch.exp(u + k[:, t])]
        out[:, t] = sum(c * v[:, i] for i, c in enumerate(weights)) / sum(weights)
    return out


def random_wkv_inputs(T: int, key_scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w, u = torch.rand(6, generator=g) * 2, torch.randn(6, generator=g)
    k, v = torch.randn(2, T, 6, generator=g) * key_scale, torch.randn(2, T, 6, generator=g)
    return w, u, k, v


@pytest.mark.parametrize("key_scale", [1.0, 60.0], ids=["moderate-keys", "keys-that-overflow-exp-in-float32"])
def test_both_forms_equal_the_definition(key_scale):
    w, u, k, v = random_wkv_inputs(12, key_scale)
    expected = wkv_by_definition(w, u, k, v).float()
    if key_scale > 50:  # the reason for the running maximum: e^{k} alone is inf in float32
        assert not torch.exp(k).isfinite().all()
    for form in (wkv_recurrent, wkv_parallel):
        out, _ = form(w, u, k, v)
        assert out.isfinite().all()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_both_forms_equal_transformers_cpu_wkv_including_the_state():
    w, u, k, v = random_wkv_inputs(17, 3.0, seed=4)
    time_decay = torch.log(w)  # transformers stores log w and uses −exp(time_decay) as the decay exponent
    ref, ref_state = modeling_rwkv.rwkv_linear_attention_cpu(time_decay, u, k, v, return_state=True)
    for form in (wkv_recurrent, wkv_parallel):
        out, (a, b, p) = form(w, u, k, v)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # the state is (a, b) times e^{p}: compare the unscaled numerator and denominator
        torch.testing.assert_close(a * p.exp(), ref_state[0] * ref_state[2].exp(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b * p.exp(), ref_state[1] * ref_state[2].exp(), rtol=1e-5, atol=1e-5)


def test_parallel_form_continues_a_state_like_the_recurrence():
    w, u, k, v = random_wkv_inputs(20, 5.0, seed=2)
    whole, _ = wkv_recurrent(w, u, k, v)
    first, state = wkv_recurrent(w, u, k[:, :7], v[:, :7])
    second, state = wkv_parallel(w, u, k[:, 7:15], v[:, 7:15], state)
    third, _ = wkv_recurrent(w, u, k[:, 15:], v[:, 15:], state)
    torch.testing.assert_close(torch.cat([first, second, third], 1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rescale_every", [0, 2], ids=["no-rescale", "rescale-every-2"])
def test_model_logits_equal_transformers(rescale_every):
    hf = hf_rwkv(rescale_every=rescale_every)
    with torch.no_grad():
        expected = hf(IDS).logits  # in eval mode this first call divides transformers' weights when rescaling
        ours = RWKV.from_hf(hf)  # and from_hf multiplies them back
        # halving the residual stream changes LayerNorm's ε term only: agreement to ~1e-4 with rescaling
        tol = 1e-5 if rescale_every == 0 else 2e-4
        torch.testing.assert_close(ours(IDS), expected, rtol=tol, atol=tol)


def test_attention_width_other_than_the_model_width():
    # transformers' full forward handles d_attn != d_model (its cached path does not: its state is d_model wide)
    hf = hf_rwkv(attention_hidden_size=24)
    ours = RWKV.from_hf(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS, use_cache=False).logits, rtol=1e-5, atol=1e-5)
        state = ours.new_state(2)
        steps = torch.cat([ours(IDS[:, t:t + 1], state) for t in range(IDS.shape[1])], 1)
        torch.testing.assert_close(steps, ours(IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [[21], [5] + [1] * 16, [1] * 21, [3, 10, 1, 7]], ids=["whole", "prefill+steps",
                                                                                      "steps", "chunks"])
@pytest.mark.parametrize("chunk", [4, 128])
def test_stepping_with_the_state_equals_the_full_forward(split, chunk):
    hf = hf_rwkv()
    ours = RWKV.from_hf(hf)
    for block in ours.blocks:
        block.attention.chunk = chunk
    with torch.no_grad():
        full = hf(IDS).logits
        state, outs, start = ours.new_state(2), [], 0
        for n in split:
            outs.append(ours(IDS[:, start:start + n], state))
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_transformers_generate():
    # one sequence at a time: transformers' one-token cached step broadcasts x_{t−1} of shape (B, d) against
    # (B, 1, d) into (B, B, d), so its batched cached generation differs from its own full forward when B > 1
    hf = hf_rwkv(seed=3)
    ours = RWKV.from_hf(hf)
    for row in range(2):
        prompt = IDS[row:row + 1, :7]
        expected = hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(prompt, 15), expected)
    batched = ours.generate(IDS[:, :7], 15)  # ours is batched: each row as if alone
    assert torch.equal(batched[1:], ours.generate(IDS[1:, :7], 15))


def test_the_state_does_not_grow_with_the_sequence():
    cfg = RWKVConfig(vocab_size=64, d_model=32, n_layers=3, d_attn=16)
    model = RWKV(cfg).eval()
    state = model.new_state(2)
    expected = 4 * cfg.n_layers * 2 * (2 * cfg.d_model + 3 * cfg.d_attn)  # float32: two shifts, (a, b, p)
    sizes = []
    with torch.no_grad():
        for n in (1, 10, 100):
            model(torch.randint(0, 64, (2, n)), state)
            sizes.append(state.nbytes())
    assert sizes == [expected] * 3


def test_save_and_load_are_exact(tmp_path):
    model = RWKV(RWKVConfig(vocab_size=64, d_model=32, n_layers=2, tie_embeddings=True)).eval()
    model.save(tmp_path / "rwkv.safetensors")
    loaded = RWKV.load(tmp_path / "rwkv.safetensors")
    assert loaded.cfg == model.cfg and loaded.lm_head.weight is loaded.embed.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    with pytest.raises(ValueError, match="holds a RWKV, not a Mamba"):
        from effref.alternatives.mamba import Mamba
        Mamba.load(tmp_path / "rwkv.safetensors")


def test_trains_a_little():
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=16, d_model=32, n_layers=2))
    data = torch.arange(16).repeat(4, 3)  # (4, 48)
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
    (dict(d_model=0), "d_model=0 must be a positive integer"),
    (dict(d_attn=0), "d_attn=0 must be a positive integer"),
    (dict(d_ff=-1), "d_ff=-1 must be a positive integer"),
    (dict(chunk=0), "chunk=0 must be a positive integer"),
])
def test_bad_configs_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RWKVConfig(**kwargs)


def test_bad_calls_are_refused_by_name():
    model = RWKV(RWKVConfig(vocab_size=64, d_model=32, n_layers=1))
    with pytest.raises(ValueError, match=r"state.batch_size=3 but input_ids has B=2; create the state with"):
        model(IDS, model.new_state(3))
    with pytest.raises(ValueError, match=r"outside this model's vocabulary 0..63"):
        model(IDS - 5)
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        RWKVState(model.cfg, 0)
    with pytest.raises(ValueError, match=r"max_new_tokens=-1.*need max_new_tokens >= 0"):
        model.generate(IDS, -1)
    with pytest.raises(ValueError, match="hf_model must be a transformers RwkvForCausalLM"):
        RWKV.from_hf(torch.nn.Linear(2, 2))
