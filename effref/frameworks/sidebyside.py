"""Our from-scratch implementations beside the real libraries: same model, same inputs, agreement and time.

Every runner returns ``Row``s. A row names the comparison, the library (with its version) and our call, the
agreement (the largest absolute difference of the outputs, or the share of identical greedy tokens for
generation), and the time ratio ``ours / library`` (above 1: ours is slower). A library that cannot be imported,
or that fails on this machine, never raises here: its row has ``status`` "unavailable" or "failed" and says why.

Comparisons: peft's LoRA against ``effref.peft`` (same A and B); transformers' LLaMA (SDPA attention) against our
``Llama`` and our paged decode attention against ``torch.nn.functional.scaled_dot_product_attention``;
transformers ``generate`` and its continuous batching (``generate_batch``) against our serving ``Engine``; the
``rwkv`` package and transformers' RWKV, Mamba and Mixtral against ``effref.alternatives`` and ``effref.moe``.
Quantization libraries are in ``effref.frameworks.quant``, lm-eval in ``effref.frameworks.harness``.

Glossary: agreement = max |ours − library| (logits) or share of equal tokens · time ratio = t_ours / t_library,
each time the best of ``repeats`` runs after one warm-up.
Left out: multi-GPU libraries (vLLM, Megatron, DeepSpeed's kernels) and multi-process ZeRO (``zero_rows`` reads
``effref.distributed`` when it offers a side-by-side; DeepSpeed ZeRO itself needs minutes of C++ builds here).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

STATUSES = ("ok", "unavailable", "failed", "cuda only")


@dataclass
class Row:
    """One side-by-side result (``agreement`` and ``time_ratio`` are None unless ``status == "ok"``)."""

    comparison: str
    library: str
    ours: str
    metric: str
    agreement: float | None = None
    time_ratio: float | None = None
    status: str = "ok"
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def library_version(module: str) -> str:
    """``"name x.y.z"`` of an importable module; raises ImportError when it is not installed."""
    importlib.import_module(module)
    return f"{module} {importlib.metadata.version(module)}"


def guarded(comparison: str, library: str, ours: str, metric: str, run: Callable[[], list[Row]]) -> list[Row]:
    """``run()``, or one row saying why it could not run (a missing library, or its error on this machine)."""
    try:
        return run()
    except ImportError as exc:
        return [Row(comparison, library, ours, metric, status="unavailable", reason=f"not importable: {exc}")]
    except Exception as exc:  # noqa: BLE001 (a library that breaks here must not break the page)
        return [Row(comparison, library, ours, metric, status="failed",
                    reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")]


def best_time(fn: Callable[[], object], repeats: int = 3) -> tuple[float, object]:
    """(fastest of ``repeats`` timed calls after one warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------------------------------------ LoRA


def lora_rows(hf_model: torch.nn.Module, ids: torch.Tensor, r: int = 8, repeats: int = 3) -> list[Row]:
    """peft's LoRA on q_proj/v_proj against ``effref.peft.apply_lora`` with the same random A and B: logits of
    the adapted model, and of the merged one (``merge_and_unload`` against ``merge_lora``)."""

    def run() -> list[Row]:
        import peft

        from effref.peft import LoraConfig, apply_lora, merge_lora

        version = f"peft {peft.__version__}"
        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates; not our concern here
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            theirs = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # peft starts B at zero, which would make every comparison trivially equal
            for name, p in theirs.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        ours = apply_lora(copy.deepcopy(hf_model), LoraConfig(r=r, alpha=2 * r,
                                                             target_modules=("q_proj", "v_proj"))).eval()
        theirs_lora = {n.split("base_model.model.")[-1].replace(".default", ""): p
                       for n, p in theirs.named_parameters() if "lora_" in n}
        ours_lora = {n: p for n, p in ours.named_parameters() if "lora_" in n}
        if sorted(theirs_lora) != sorted(ours_lora):
            raise RuntimeError(f"adapter names differ: {sorted(theirs_lora)[:2]} vs {sorted(ours_lora)[:2]}")
        with torch.no_grad():
            for n, p in ours_lora.items():
                p.copy_(theirs_lora[n])
            t_theirs, out_theirs = best_time(lambda: _logits(theirs, ids), repeats)
            t_ours, out_ours = best_time(lambda: _logits(ours, ids), repeats)
            merged_theirs = _logits(theirs.merge_and_unload(), ids)
            merged_ours = _logits(merge_lora(ours), ids)
        return [Row(f"LoRA forward (r={r}, q/v)", version, "effref.peft.apply_lora", "max |Δ logits|",
                    max_diff(out_ours, out_theirs), t_ours / t_theirs),
                Row("LoRA merged into the weights", version, "effref.peft.merge_lora", "max |Δ logits|",
                    max_diff(merged_ours, merged_theirs), None)]

    return guarded("LoRA", "peft", "effref.peft.apply_lora", "max |Δ logits|", run)


# ------------------------------------------------------------------------------------------------ attention


def attention_rows(hf_model: torch.nn.Module, ids: torch.Tensor, repeats: int = 3) -> list[Row]:
    """transformers' LLaMA with SDPA attention against our ``Llama`` on the same weights (whole-model logits),
    and our paged decode attention against ``F.scaled_dot_product_attention`` on one layer's K/V."""
    import transformers

    from effref.models.llama import Llama
    from effref.serving import paged_attention

    version = f"transformers {transformers.__version__}"

    def model_rows() -> list[Row]:
        hf_model.config._attn_implementation = "sdpa"
        ours = Llama.from_hf(hf_model).eval()
        with torch.no_grad():
            t_hf, out_hf = best_time(lambda: _logits(hf_model, ids), repeats)
            t_ours, out_ours = best_time(lambda: ours(ids), repeats)
        return [Row("LLaMA forward (SDPA attention)", version, "effref.models.llama.Llama", "max |Δ logits|",
                    max_diff(out_ours, out_hf), t_ours / t_hf)]

    def decode_rows() -> list[Row]:
        g = torch.Generator().manual_seed(0)
        B, H, H_kv, d, T, block = 4, 8, 2, 64, 200, 16  # 4 sequences of 200 cached tokens, GQA 8 / 2 heads
        q = torch.randn(B, H, d, generator=g)  # (B, H, d)
        k, v = (torch.randn(B, H_kv, T, d, generator=g) for _ in range(2))  # (B, H_kv, T, d)
        n_blocks = -(-T // block)
        pool_k = torch.zeros(B * n_blocks, block, H_kv, d)  # (blocks, block, H_kv, d), blocks in shuffled order
        pool_v = torch.zeros_like(pool_k)
        order = torch.randperm(B * n_blocks, generator=g)
        tables = order.view(B, n_blocks)
        for b in range(B):
            for j in range(n_blocks):
                span = slice(j * block, min(T, (j + 1) * block))
                n = span.stop - span.start
                pool_k[tables[b, j], :n] = k[b, :, span].transpose(0, 1)
                pool_v[tables[b, j], :n] = v[b, :, span].transpose(0, 1)
        lens = torch.full((B,), T)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def reference():
            kk, vv = (x.repeat_interleave(H // H_kv, dim=1) for x in (k, v))  # (B, H, T, d)
            return sdpa(q[:, :, None], kk, vv)[:, :, 0]  # (B, H, d)

        t_ref, ref = best_time(reference, repeats)
        t_ours, ours = best_time(lambda: paged_attention(q, pool_k, pool_v, tables, lens), repeats)
        return [Row("decode attention over a paged KV cache", f"torch {torch.__version__} SDPA",
                    "effref.serving.paged_attention", "max |Δ output|", max_diff(ours, ref), t_ours / t_ref)]

    return (guarded("LLaMA forward", version, "effref.models.llama.Llama", "max |Δ logits|", model_rows)
            + guarded("decode attention", "torch SDPA", "effref.serving.paged_attention", "max |Δ output|",
                      decode_rows))


# ------------------------------------------------------------------------------------------------ generation


def _static_generate(hf_model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """One left-padded batch through transformers ``generate`` (greedy, exactly ``new_tokens`` each)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, width)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)  # (B, width + new)
    return out[:, width:].tolist()


def _token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def generation_rows(hf_model, prompts: list[list[int]], new_tokens: int, pad_id: int = 0,
                    repeats: int = 1) -> list[Row]:
    """transformers ``generate`` (one static batch) and ``generate_batch`` (its continuous batching, paged
    cache) against our ``Engine`` on the same prompts: share of identical greedy tokens, time ratio.

    Both baselines are timed against the same run of our engine (``repeats`` runs, best kept)."""
    import transformers

    from effref.models.llama import Llama
    from effref.serving import Engine

    version = f"transformers {transformers.__version__}"
    if not prompts or new_tokens < 1:
        raise ValueError(f"need at least one prompt and new_tokens >= 1, got {len(prompts)} and {new_tokens}")
    ours_model = Llama.from_hf(hf_model).eval()
    blocks = len(prompts) * (-(-(max(map(len, prompts)) + new_tokens) // 16) + 1)

    def engine_run():
        return Engine(ours_model, num_blocks=blocks, block_size=16, max_batch=len(prompts)).generate(
            prompts, new_tokens)

    with torch.no_grad():
        t_ours, ours = best_time(engine_run, repeats)

    def static() -> list[Row]:
        with torch.no_grad():
            t, ref = best_time(lambda: _static_generate(hf_model, prompts, new_tokens, pad_id), repeats)
        return [Row("greedy generation, static batch", f"{version} generate", "effref.serving.Engine",
                    "share of equal tokens", _token_agreement(ours, ref), t_ours / t)]

    def continuous() -> list[Row]:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=pad_id)
        cb = ContinuousBatchingConfig(num_blocks=blocks, page_size=16,
                                      max_batch_tokens=sum(map(len, prompts)) + len(prompts))

        def run_cb():  # the default config sizes its static buffers from free memory (~20 s of fill on a CPU)
            out = hf_model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb,
                                          warmup=False, progress_bar=False)
            return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]

        t, ref = best_time(run_cb, repeats)
        return [Row("greedy generation, continuous batching", f"{version} generate_batch",
                    "effref.serving.Engine", "share of equal tokens", _token_agreement(ours, ref), t_ours / t)]

    return (guarded("static generate", version, "effref.serving.Engine", "share of equal tokens", static)
            + guarded("continuous batching", f"{version} generate_batch", "effref.serving.Engine",
                      "share of equal tokens", continuous))


# ------------------------------------------------------------------------------------------------ architectures


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def rwkv_package_model(hf_model, path: str):
    """The official ``rwkv`` package's RWKV-4 (``strategy="cpu fp32"``) on the weights of a transformers
    ``RwkvForCausalLM`` (built with ``rescale_every=0``), written to ``path`` under the package's names."""
    import os

    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as PackageRWKV

    names = {"rwkv.embeddings.": "emb.", "rwkv.ln_out.": "ln_out.", "rwkv.blocks.": "blocks.", ".pre_ln.": ".ln0.",
             ".attention.": ".att.", ".feed_forward.": ".ffn.", "time_mix_key": "time_mix_k",
             "time_mix_value": "time_mix_v", "time_mix_receptance": "time_mix_r"}
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for old, new in names.items():
            name = name.replace(old, new)
        state[name] = tensor.detach().clone()
    torch.save(state, path)
    return PackageRWKV(model=path.removesuffix(".pth"), strategy="cpu fp32")


def architecture_rows(repeats: int = 3, seq_len: int = 24) -> list[Row]:
    """Tiny random RWKV-4, Mamba and Mixtral from transformers (and RWKV-4 from the ``rwkv`` package) against
    ours on the same weights and tokens: max |Δ logits| and time ratio of a full forward."""
    import tempfile

    import transformers

    from effref.alternatives import RWKV, Mamba
    from effref.moe import Mixtral

    transformers.logging.set_verbosity_error()
    version = f"transformers {transformers.__version__}"
    ids = torch.randint(0, 64, (1, seq_len), generator=torch.Generator().manual_seed(1))  # (1, T)

    def compare(name: str, hf, ours_cls, ours_name: str) -> list[Row]:
        ours = ours_cls.from_hf(hf).eval()
        with torch.no_grad():
            t_hf, out_hf = best_time(lambda: _logits(hf, ids), repeats)
            t_ours, out_ours = best_time(lambda: _logits(ours, ids), repeats)
        return [Row(name, version, ours_name, "max |Δ logits|", max_diff(out_ours, out_hf), t_ours / t_hf)]

    torch.manual_seed(0)
    hf_rwkv = _perturbed(transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
        context_length=64, rescale_every=0)), 0)
    hf_mamba = _perturbed(transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
        use_mambapy=False)), 1)
    hf_mixtral = _perturbed(transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)), 2, 0.3)

    def package() -> list[Row]:
        version_pkg = library_version("rwkv")
        ours = RWKV.from_hf(hf_rwkv).eval()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # it prints a lot
            pkg = rwkv_package_model(hf_rwkv, f"{tmp}/rwkv4.pth")

        def run_pkg():  # the package's sequence mode: all tokens at once, logits of the last one
            return pkg.forward(ids[0].tolist(), None, full_output=True)[0]

        with torch.no_grad():
            t_pkg, out_pkg = best_time(run_pkg, repeats)
            t_ours, out_ours = best_time(lambda: ours(ids)[0], repeats)
        return [Row("RWKV-4 forward", f"{version_pkg} (cpu fp32)",
                    "effref.alternatives.RWKV", "max |Δ logits|", max_diff(out_ours, out_pkg), t_ours / t_pkg)]

    return (guarded("RWKV-4 forward", "rwkv", "effref.alternatives.RWKV", "max |Δ logits|", package)
            + guarded("RWKV-4 forward", version, "effref.alternatives.RWKV", "max |Δ logits|",
                      lambda: compare("RWKV-4 forward", hf_rwkv, RWKV, "effref.alternatives.RWKV"))
            + guarded("Mamba forward", version, "effref.alternatives.Mamba", "max |Δ logits|",
                      lambda: compare("Mamba forward (PyTorch path)", hf_mamba, Mamba, "effref.alternatives.Mamba"))
            + guarded("Mixtral forward", version, "effref.moe.Mixtral", "max |Δ logits|",
                      lambda: compare("Mixtral forward (4 experts, top-2)", hf_mixtral, Mixtral,
                                      "effref.moe.Mixtral")))


# ------------------------------------------------------------------------------------------------ ZeRO


def zero_rows() -> list[Row]:
    """Our ZeRO against torch's ``ZeroRedundancyOptimizer`` / FSDP2 / DeepSpeed, when ``effref.distributed``
    offers ``zero_side_by_side()`` (a list of dicts with this module's ``Row`` fields; each comparison is
    prefixed "ZeRO"); else one row saying it is not available."""
    comparison, library, metric = "ZeRO vs ZeroRedundancyOptimizer / FSDP2 / DeepSpeed", "torch.distributed", \
        "max |Δ loss|"
    try:
        distributed = importlib.import_module("effref.distributed")
        side_by_side = distributed.zero_side_by_side
    except (ImportError, AttributeError) as exc:
        return [Row(comparison, library, "effref.distributed", metric, status="unavailable",
                    reason=f"not available: effref.distributed offers no zero_side_by_side ({type(exc).__name__})")]
    def named(row: dict) -> Row:  # every row of this group reads "ZeRO ..." so that tables can tell them apart
        title = row["comparison"] if row["comparison"].startswith("ZeRO") else f"ZeRO · {row['comparison']}"
        return Row(**{**row, "comparison": title})

    return guarded(comparison, library, "effref.distributed", metric, lambda: [named(r) for r in side_by_side()])


# Libraries that need a CUDA GPU: not run here; their own published numbers, cited.
CUDA_ONLY = (
    {"library": "vLLM", "what it builds": "PagedAttention serving", "published claim":
     "2-4x throughput of FasterTransformer and Orca at the same latency", "cite": "kwon2023vllm",
     "ours": "effref.serving.Engine"},
    {"library": "FlashAttention", "what it builds": "IO-aware exact attention kernel", "published claim":
     "3x faster GPT-2 training (sequence 1K), 15% faster BERT-large than the MLPerf 1.1 record",
     "cite": "dao2022flashattention", "ours": "kernels/flash_decoding.py (decode only)"},
    {"library": "mamba-ssm", "what it builds": "fused selective-scan CUDA kernel", "published claim":
     "5x higher generation throughput than a Transformer of similar size", "cite": "gu2023mamba",
     "ours": "effref.alternatives.Mamba (PyTorch scan)"},
    {"library": "MegaBlocks", "what it builds": "block-sparse dropless MoE kernels", "published claim":
     "up to 40% faster than Tutel's MoE, 2.4x faster than dense Megatron-LM training", "cite": "gale2023megablocks",
     "ours": "effref.moe.dropless_experts"},
    {"library": "DeepSpeed (CUDA kernels)", "what it builds": "fused inference kernels, ZeRO-Inference",
     "published claim": "models over 100B parameters trained with super-linear speedup on 400 GPUs",
     "cite": "rajbhandari2020zero", "ours": "effref.distributed.ZeroEngine (ZeRO 1-3, against DeepSpeed on gloo above)"},
)
