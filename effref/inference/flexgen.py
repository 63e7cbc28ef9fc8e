"""FlexGen's offloading cost model: where to keep weights, KV cache and activations, found by a linear program.

Paper: Sheng, Zheng, Yuan, Li, Ryabinin, Chen, Liang, Ré, Stoica, Zhang (2023), "FlexGen: High-Throughput
Generative Inference of Large Language Models with a Single GPU", arXiv:2303.06865 — §4 (zig-zag block
schedule, cost model, policy search by linear programming, 4-bit group-wise compression).
Implements: the zig-zag block schedule runs one layer for all k GPU batches of a block (bls = k · gbs
sequences) before loading the next layer, so a layer's weights cross the PCIe bus once per block and token.
With loads, stores and compute of one layer overlapped, a layer costs the slowest of five streams,
  T_layer = max(ctog, gtoc, dtoc, ctod, comp)   (CPU→GPU, GPU→CPU, disk→CPU, CPU→disk, GPU compute),
every stream linear in the placement fractions; a generation costs T = l · (T_pre + (n − 1) · T_gen) with
T_gen taken at the mean context s + n/2, and throughput = bls · n / T (generated tokens over total time).
For fixed (gbs, k) the placement minimising T under the three memory capacities is a linear program in
  x = (wg, wc, wd, cg, cc, cd, hg, hc, hd, T_pre, T_gen),
each triple summing to 1; ``search_policy`` solves it for every (gbs, k) of a grid and keeps the best.
4-bit compression (group size 64, an fp16 scale and minimum per group) shrinks weight and KV bytes to
0.5625 per number and adds a dequantisation pass on the GPU.
Glossary: l ``n_layers`` · h1 ``d_model`` · h2 ``d_ff`` · s ``prompt_len`` · n ``gen_len`` · gbs
          ``gpu_batch`` · k ``num_batches`` · bls = gbs · k · w*/c*/h* fractions of weights / KV cache /
          activations on g(pu), c(pu), d(isk).
Left out: the paper's CPU computation of attention (delegating it when the cache sits on the CPU), its
          profiled hardware constants (ours are spec-sheet or illustrative numbers), and rounding the fractions
          to whole layers and tensors; the model is an idealised upper bound on real throughput.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import numpy as np
from scipy.optimize import linprog

from effref.models.llama import LLAMA_SHAPED, LlamaConfig

GB = 1e9
FP16 = 2.0  # bytes per number
Q4_G64 = 0.5 + 2 * FP16 / 64  # 4-bit codes + fp16 scale and minimum per group of 64 numbers
STREAMS = ("ctog", "gtoc", "dtoc", "ctod", "comp")


@dataclass(frozen=True)
class Hardware:
    """Capacities in bytes, bandwidths in bytes/s, ``gpu_flops`` the fp16 FLOP/s a layer's matmuls reach."""

    name: str
    gpu_mem: float
    cpu_mem: float
    disk: float
    ctog_bw: float  # CPU → GPU (PCIe)
    gtoc_bw: float  # GPU → CPU
    dtoc_bw: float  # disk read
    ctod_bw: float  # disk write
    gpu_flops: float
    gpu_mem_bw: float  # GPU memory (HBM / GDDR) bandwidth

    def __post_init__(self) -> None:
        for f in fields(self)[1:]:
            if not getattr(self, f.name) > 0:
                raise ValueError(f"Hardware.{f.name}={getattr(self, f.name)} must be positive")


# The paper's machine: one T4 (16 GB) with 208 GB of DRAM and a 1.5 TB SSD (FlexGen §6). Bandwidths and FLOP/s
# are illustrative: T4 spec-sheet HBM bandwidth and fp16 peak derated to 50%, PCIe 3 ×16 at ~12 GB/s, an NVMe
# read/write of 2 / 1 GB/s; the paper profiles its own.
T4_FLEXGEN = Hardware("T4 16 GB + 208 GB DRAM + 1.5 TB SSD", gpu_mem=16 * GB, cpu_mem=208 * GB, disk=1500 * GB,
                      ctog_bw=12 * GB, gtoc_bw=12 * GB, dtoc_bw=2 * GB, ctod_bw=1 * GB,
                      gpu_flops=32e12, gpu_mem_bw=320 * GB)


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    mlp_mats: int = 2  # 2 for OPT's ReLU MLP (up, down), 3 for a gated one (gate, up, down)
    d_head: int | None = None  # None: d_model / n_heads (Gemma decouples them)

    def __post_init__(self) -> None:
        for f in fields(self)[1:]:
            if getattr(self, f.name) is not None and getattr(self, f.name) < 1:
                raise ValueError(f"ModelShape.{f.name}={getattr(self, f.name)} must be a positive integer")

    @property
    def q_dim(self) -> int:  # queries (and attention outputs) per token and layer: n_heads · d_head
        return self.d_model if self.d_head is None else self.n_heads * self.d_head

    @property
    def kv_dim(self) -> int:  # keys (or values) per token and layer
        return (self.d_model // self.n_heads if self.d_head is None else self.d_head) * self.n_kv_heads

    @property
    def layer_params(self) -> int:  # q, o: h1 · q_dim, k, v: h1 · kv_dim each, MLP: mlp_mats · h1 · h2
        return 2 * self.d_model * (self.q_dim + self.kv_dim) + self.mlp_mats * self.d_model * self.d_ff

    @classmethod
    def from_llama_config(cls, cfg, name: str = "llama") -> ModelShape:
        """The shape of an ``effref.models.llama.LlamaConfig`` (gated MLP, grouped-query attention, its d_head;
        Qwen2's q/k/v biases, a few thousand numbers, are not counted)."""
        if not isinstance(cfg, LlamaConfig):
            got = f"{type(cfg).__module__}.{type(cfg).__qualname__}"
            if getattr(cfg, "model_type", None) is not None:
                got += f" (model_type {cfg.model_type!r})"
            raise TypeError(f"cfg must be effref's LlamaConfig, got {got}; for a transformers model of a "
                            f"LLaMA-shaped family ({', '.join(LLAMA_SHAPED)}) pass Llama.from_hf(model).cfg; "
                            "describe other shapes directly, e.g. OPT as ModelShape(name, n_layers, d_model, "
                            "n_heads, n_heads, ffn_dim, mlp_mats=2) (flexgen.opt(size) for the paper's OPTs)")
        return cls(name, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, mlp_mats=3,
                   d_head=cfg.head_dim)


def opt(size: str) -> ModelShape:
    """OPT-6.7B / 30B / 175B (Zhang et al. 2022), the models of the FlexGen paper."""
    shapes = {"6.7b": (32, 4096, 32), "30b": (48, 7168, 56), "175b": (96, 12288, 96)}
    if size.lower() not in shapes:
        raise ValueError(f"size={size!r} is not one of {sorted(shapes)}")
    layers, d, heads = shapes[size.lower()]
    return ModelShape(f"OPT-{size.upper()}", layers, d, heads, heads, 4 * d, mlp_mats=2)


@dataclass(frozen=True)
class Workload:
    prompt_len: int  # s
    gen_len: int  # n
    gpu_batch: int = 1  # gbs, sequences per GPU batch
    num_batches: int = 1  # k, GPU batches per block of the zig-zag schedule
    compress: bool = False  # 4-bit group-wise weights and KV cache

    def __post_init__(self) -> None:
        for f in fields(self)[:4]:
            if getattr(self, f.name) < 1:
                raise ValueError(f"Workload.{f.name}={getattr(self, f.name)} must be a positive integer")

    @property
    def block(self) -> int:  # bls
        return self.gpu_batch * self.num_batches


@dataclass(frozen=True)
class Placement:
    wg: float = 1.0
    wc: float = 0.0
    wd: float = 0.0
    cg: float = 1.0
    cc: float = 0.0
    cd: float = 0.0
    hg: float = 1.0
    hc: float = 0.0
    hd: float = 0.0

    def __post_init__(self) -> None:
        for name, triple in zip(("weights", "cache", "activations"), np.reshape(astuple(self), (3, 3))):
            if triple.min() < -1e-9 or abs(triple.sum() - 1) > 1e-6:
                raise ValueError(f"{name} fractions (gpu, cpu, disk) = {tuple(triple.round(4))} must be >= 0 "
                                 "and sum to 1; e.g. Placement(wg=0.2, wc=0.8, wd=0.0, ...)")


def cost_terms(model: ModelShape, hw: Hardware, wl: Workload) -> dict[str, tuple[np.ndarray, float]]:
    """Every stream time and memory peak as a linear form (coeffs over the 9 fractions, constant).

    Keys: ``pre_<stream>`` and ``gen_<stream>`` in seconds per layer, ``mem_gpu``/``mem_cpu``/``mem_disk`` in
    bytes. The cost model, the LP and the brute-force tests all read this one table.
    """
    b = Q4_G64 if wl.compress else FP16
    s, n, bls, h1, l = wl.prompt_len, wl.gen_len, wl.block, model.d_model, model.n_layers
    W = model.layer_params * b  # one layer's weights in bytes

    def kv(t: float, batch: int = bls) -> float:  # bytes of keys + values of t tokens, one layer
        return 2 * batch * t * model.kv_dim * b

    t_mean = s + n / 2  # mean context of a decoding step (Eq. in §4.3)
    act_pre, act_gen = bls * s * h1 * FP16, bls * h1 * FP16  # hidden states crossing one layer boundary

    def lin(**c: float) -> np.ndarray:  # coefficients over (wg, wc, wd, cg, cc, cd, hg, hc, hd)
        return np.array([c.get(f.name, 0.0) for f in fields(Placement)])

    def comp(tokens: int, ctx: float, kv_read: float) -> float:
        flops = 2 * model.layer_params * bls * tokens + 4 * bls * tokens * ctx * model.d_model  # matmuls, qkᵀ, av
        touched = model.layer_params * FP16 + kv_read / b * FP16  # fp16 weights and cache read by the kernels
        dequant = (model.layer_params + kv_read / b) * (b + 2 * FP16) if wl.compress else 0.0  # read q, write fp16
        return max(flops / hw.gpu_flops, touched / hw.gpu_mem_bw) + dequant / hw.gpu_mem_bw

    terms = {}
    for phase, act, kv_new, kv_read, tokens, ctx in (("pre", act_pre, kv(s), 0.0, s, s / 2),
                                                      ("gen", act_gen, kv(1), kv(t_mean), 1, t_mean)):
        terms[f"{phase}_ctog"] = (lin(wc=W, wd=W, cc=kv_read, cd=kv_read, hc=act, hd=act) / hw.ctog_bw, 0.0)
        terms[f"{phase}_gtoc"] = (lin(cc=kv_new, cd=kv_new, hc=act, hd=act) / hw.gtoc_bw, 0.0)
        terms[f"{phase}_dtoc"] = (lin(wd=W, cd=kv_read, hd=act) / hw.dtoc_bw, 0.0)
        terms[f"{phase}_ctod"] = (lin(cd=kv_new, hd=act) / hw.ctod_bw, 0.0)
        terms[f"{phase}_comp"] = (lin(), comp(tokens, ctx, kv_read))
    W_all, kv_all, act_all = l * W, l * kv(s + n), act_pre  # activations: one layer boundary of the block
    gbs = wl.gpu_batch  # GPU working set: two fp16 layers (current, next), one GPU batch's intermediates and cache
    work = (2 * model.layer_params * FP16 + gbs * s * (3 * h1 + 2 * model.d_ff) * FP16
            + gbs * model.n_heads * s * s * FP16 + 2 * kv(s + n, gbs) / b * FP16)
    terms["mem_gpu"] = (lin(wg=W_all, cg=kv_all, hg=act_all), work)
    terms["mem_cpu"] = (lin(wc=W_all, cc=kv_all, hc=act_all, wd=2 * W, cd=2 * kv(s + n), hd=act_all), 0.0)
    terms["mem_disk"] = (lin(wd=W_all, cd=kv_all, hd=act_all), 0.0)
    return terms


@dataclass
class PolicyCost:
    workload: Workload
    placement: Placement
    pre_layer_s: float  # T_pre, seconds per layer
    gen_layer_s: float  # T_gen
    total_s: float  # T, the latency of the block: prefill plus n − 1 decoding steps
    throughput: float  # generated tokens per second, bls · n / T
    memory: dict[str, float]  # peak bytes per tier
    bottleneck: str  # the slowest decode stream


def evaluate(model: ModelShape, hw: Hardware, wl: Workload, placement: Placement) -> PolicyCost:
    """The cost of one policy; raises if a memory tier overflows."""
    terms, x = cost_terms(model, hw, wl), np.array(astuple(placement))
    value = {key: float(c @ x + k) for key, (c, k) in terms.items()}
    for tier, cap in (("gpu", hw.gpu_mem), ("cpu", hw.cpu_mem), ("disk", hw.disk)):
        if value[f"mem_{tier}"] > cap * (1 + 1e-9):
            raise ValueError(f"placement needs {value[f'mem_{tier}'] / GB:.1f} GB of {tier} memory but "
                             f"{hw.name} has {cap / GB:.1f} GB; move weights/cache to a lower tier or shrink the batch")
    pre, gen = (max(value[f"{phase}_{s}"] for s in STREAMS) for phase in ("pre", "gen"))
    total = model.n_layers * (pre + (wl.gen_len - 1) * gen)
    return PolicyCost(wl, placement, pre, gen, total, wl.block * wl.gen_len / total,
                      {t: value[f"mem_{t}"] for t in ("gpu", "cpu", "disk")},
                      max(STREAMS, key=lambda s: value[f"gen_{s}"]))


def solve_placement(model: ModelShape, hw: Hardware, wl: Workload) -> PolicyCost | None:
    """The LP of §4.3 for a fixed batch configuration: the fastest feasible placement, or None if none fits."""
    terms = cost_terms(model, hw, wl)
    rows, rhs = [], []
    for phase, col in (("pre", 9), ("gen", 10)):  # stream ≤ T_phase  ⇔  c·x − T_phase ≤ −k
        for stream in STREAMS:
            c, k = terms[f"{phase}_{stream}"]
            rows.append(np.r_[c, -1.0 * (col == 9), -1.0 * (col == 10)])
            rhs.append(-k)
    for tier, cap in (("gpu", hw.gpu_mem), ("cpu", hw.cpu_mem), ("disk", hw.disk)):
        c, k = terms[f"mem_{tier}"]
        rows.append(np.r_[c, 0, 0] / cap)  # scaled to O(1) for the solver
        rhs.append(1 - k / cap)
    eq = np.zeros((3, 11))
    for i in range(3):
        eq[i, 3 * i:3 * i + 3] = 1
    cost = np.r_[np.zeros(9), 1.0, wl.gen_len - 1.0]  # T / l
    res = linprog(cost, A_ub=np.array(rows), b_ub=rhs, A_eq=eq, b_eq=np.ones(3),
                  bounds=[(0, 1)] * 9 + [(0, None)] * 2, method="highs")
    if res.status != 0:
        return None
    x = np.clip(res.x[:9], 0, 1).reshape(3, 3)
    x = x / x.sum(1, keepdims=True)  # remove solver round-off so the triples sum to exactly 1
    return evaluate(model, hw, wl, Placement(*x.ravel()))


def search_policy(model: ModelShape, hw: Hardware, prompt_len: int, gen_len: int,
                  gpu_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                  num_batches: tuple[int, ...] = (1, 2, 4, 8, 16), compress: bool = False,
                  max_latency_s: float | None = None) -> list[PolicyCost]:
    """Solve the LP for every (gbs, k) and return the feasible policies, best throughput first.

    With ``max_latency_s`` only policies whose block finishes within that time are kept (the paper's latency-
    constrained search). An empty list means nothing fits: a bigger machine or compression is needed.
    """
    if max_latency_s is not None and max_latency_s <= 0:
        raise ValueError(f"max_latency_s={max_latency_s} must be positive (or None for no limit)")
    found = []
    for gbs in gpu_batches:
        for k in num_batches:
            best = solve_placement(model, hw, Workload(prompt_len, gen_len, gbs, k, compress))
            if best is not None and (max_latency_s is None or best.total_s <= max_latency_s):
                found.append(best)
    return sorted(found, key=lambda p: -p.throughput)


def gpu_only(model: ModelShape, hw: Hardware, wl: Workload) -> PolicyCost | None:
    """Everything on the GPU (no offloading), or None when that does not fit."""
    try:
        return evaluate(model, hw, wl, Placement())
    except ValueError:
        return None

