"""A paper-and-pencil simulator of distributed training: bytes per GPU and bytes on the wire, by strategy.

Papers: Rajbhandari, Rasley, Ruwase, He (2020), "ZeRO", arXiv:1910.02054 — §3 and Fig. 1 (model-state memory),
§7 (communication volume); Ren et al. (2021), "ZeRO-Offload", arXiv:2101.06840; Shoeybi et al. (2019),
"Megatron-LM", arXiv:1909.08053 (tensor parallelism); Huang et al. (2019), "GPipe", arXiv:1811.06965 (bubble).
Implements: mixed-precision Adam keeps, per parameter, 2 bytes of fp16 weights, 2 of fp16 gradients and K of
optimizer states (fp32 master weights, momentum and variance: K = 12). With N_d data-parallel GPUs:
    DP      (2 + 2 + K) Ψ                  ZeRO-1 (P_os)       2Ψ + 2Ψ + KΨ / N_d
    ZeRO-2  2Ψ + (2 + K) Ψ / N_d           ZeRO-3 (P_os+g+p)   (2 + 2 + K) Ψ / N_d
    ZeRO-Offload (on top of ZeRO-2): the GPU keeps the 2Ψ fp16 weights; gradients and optimizer states,
    (2 + K) Ψ / N_d, live in CPU memory and the optimizer steps there.
Tensor (degree t) and pipeline (p stages) parallelism divide all model states by t·p: Ψ → Ψ / (t·p) above.
Communication per GPU and step, in parameter elements: data parallelism all-reduces the gradients, a
reduce-scatter plus an all-gather, 2Ψ; ZeRO-1 and 2 move the same 2Ψ; ZeRO-3 all-gathers the weights twice
(forward and backward) and reduce-scatters the gradients, 3Ψ — 1.5× (a ring moves (N_d − 1)/N_d of that).
A tensor-parallel layer all-reduces a (b, s, h) activation twice forward and twice backward; a pipeline
boundary sends one activation forward and its gradient back per micro-batch; the pipeline idles
(p − 1)/(m + p − 1) of the time.
Glossary: Ψ ``params`` · N_d ``gpus`` (data-parallel degree) · K ``k`` · t ``tp`` · p ``pp`` (stages) · m
          ``micro_batches`` · b, s, h batch, sequence length, hidden size.
Left out: activation memory (it depends on the batch, sequence length and recomputation), temporary buffers
and fragmentation, which the ZeRO paper calls residual states; overlap of communication with compute.
Simplification: 1 GB = 10⁹ bytes, as in the ZeRO paper's Figure 1.
"""

from __future__ import annotations

STRATEGIES = ("DP", "ZeRO-1", "ZeRO-2", "ZeRO-3")  # increasingly sharded; "ZeRO-Offload" is on its own


def _positive(**values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0")


def memory_per_gpu(params: float, gpus: int, strategy: str = "DP", k: float = 12, tp: int = 1, pp: int = 1,
                   param_bytes: int = 2) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer states (and CPU bytes, for offload).

    ``param_bytes`` per weight and per gradient: 2 in mixed precision (the paper), 4 for fp32 training (then
    Adam's K = 8: momentum and variance, no master copy).
    """
    _positive(params=params, gpus=gpus, k=k, tp=tp, pp=pp, param_bytes=param_bytes)
    if strategy not in STRATEGIES + ("ZeRO-Offload",):
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES + ('ZeRO-Offload',)}")
    psi = params / (tp * pp)  # model states of this GPU's tensor and pipeline shard
    level = {"DP": 0, "ZeRO-1": 1, "ZeRO-2": 2, "ZeRO-3": 3, "ZeRO-Offload": 2}[strategy]
    sizes = {"weights": param_bytes * psi / (gpus if level >= 3 else 1),
             "gradients": param_bytes * psi / (gpus if level >= 2 else 1),
             "optimizer": k * psi / (gpus if level >= 1 else 1)}
    cpu = 0.0
    if strategy == "ZeRO-Offload":
        cpu = sizes.pop("gradients") + sizes.pop("optimizer")
        sizes.update(gradients=0.0, optimizer=0.0)
    return {**sizes, "gpu_total": sum(sizes.values()), "cpu": cpu}


def communication_elements(params: float, strategy: str = "DP", gpus: int | None = None) -> float:
    """Parameter elements each GPU sends per step for data parallelism: 2Ψ, or 3Ψ for ZeRO-3.

    With ``gpus``, the ring algorithms' exact share (N_d − 1)/N_d is applied; without, the paper's round count.
    """
    _positive(params=params)
    if strategy not in STRATEGIES + ("ZeRO-Offload",):
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES + ('ZeRO-Offload',)}")
    volume = (3 if strategy == "ZeRO-3" else 2) * params
    if gpus is None:
        return volume
    _positive(gpus=gpus)
    return volume * (gpus - 1) / gpus


def tensor_parallel_bytes(layers: int, tokens: int, hidden: int, tp: int, bytes_per_value: int = 2) -> float:
    """Bytes one GPU sends per step: 4 ring all-reduces of (tokens × hidden) per layer, 2(t − 1)/t of each."""
    _positive(layers=layers, tokens=tokens, hidden=hidden, tp=tp, bytes_per_value=bytes_per_value)
    return layers * 4 * 2 * (tp - 1) / tp * tokens * hidden * bytes_per_value


def pipeline_bytes(tokens: int, hidden: int, bytes_per_value: int = 2) -> float:
    """Bytes crossing one stage boundary per step: every token's activation forward and its gradient back."""
    _positive(tokens=tokens, hidden=hidden, bytes_per_value=bytes_per_value)
    return 2 * tokens * hidden * bytes_per_value


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """GPipe's (and 1F1B's) idle share of a pipeline step, (p − 1)/(m + p − 1)."""
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be an int ≥ 1")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be an int ≥ 1")
    return (stages - 1) / (micro_batches + stages - 1)


def transfer_seconds(nbytes: float, bandwidth: float) -> float:
    """Time to send ``nbytes`` over a link of ``bandwidth`` bytes per second (no latency, no overlap)."""
    _positive(bandwidth=bandwidth)
    return nbytes / bandwidth


def least_sharded_fit(params: float, gpus: int, gpu_bytes: float = 80e9, k: float = 12) -> str | None:
    """The first of DP, ZeRO-1, ZeRO-2, ZeRO-3 whose model states fit in ``gpu_bytes``; None if none does.

    Less sharding means less communication (ZeRO-3 moves 1.5× the bytes), so the first fit is the cheapest.
    """
    _positive(gpu_bytes=gpu_bytes)
    for strategy in STRATEGIES:
        if memory_per_gpu(params, gpus, strategy, k)["gpu_total"] <= gpu_bytes:
            return strategy
    return None
