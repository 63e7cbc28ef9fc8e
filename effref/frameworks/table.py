"""The survey's Table 2 (§4, "LLM frameworks") as data, each feature tied to where this book builds it.

Source: Wan et al. (2024), *Efficient Large Language Models: A Survey*, §4 and Table 2 ("Comparison of LLM
frameworks"): fourteen frameworks, whether each supports training, fine-tuning and inference, and the features
the survey lists for it. ``FRAMEWORKS`` transcribes the table row by row (the survey's feature names, its
spelling normalised, e.g. "Tensor Paralellism" → "tensor parallelism", "Distribute Inference" → "distributed
inference"). ``FEATURES`` maps every feature to the catalog entries (``effref/catalog.yml``) of the techniques
that implement it here; the chapter comes from the catalog, so a feature links to a chapter exactly when the
catalog marks one of its techniques implemented, and otherwise reads "not built" with the reason.

Glossary: feature = one item of Table 2's "Features" column · link = the catalog ids that build it · built = at
least one linked catalog entry is implemented (it then has a chapter).
Left out: the survey's prose beyond the table (DeepSpeed-MII, DeepSpeed-Chat, TensorRT-LLM are named in the text
but not in the table's rows), and any judgement of the frameworks themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from effref.catalog import Entry, load_catalog


@dataclass(frozen=True)
class Framework:
    """One row of Table 2: name, the three "supports" columns, the features (normalised names), citation key."""

    name: str
    training: bool
    finetuning: bool
    inference: bool
    features: tuple[str, ...]
    cite: str  # key in book/references.bib


@dataclass(frozen=True)
class Feature:
    """A feature of Table 2 and the catalog ids that build it in effref (empty: the book does not build it)."""

    name: str
    catalog_ids: tuple[str, ...]
    note: str  # what the book has instead, or why it is not built


_INTEGRATIONS = "integrations (BentoML, LangChain, Transformers Agents)"
_ALL = (True, True, True)
_INFER = (False, False, True)
FRAMEWORKS: tuple[Framework, ...] = tuple(Framework(name, *supports, tuple(features), cite) for name, supports,
                                          features, cite in [
    ("DeepSpeed", _ALL, ["data parallelism", "model parallelism", "pipeline parallelism", "prompt batching",
                         "quantization", "kernel optimizations", "compression", "mixture of experts"],
     "rasley2020deepspeed"),
    ("Megatron", _ALL, ["data parallelism", "model parallelism", "pipeline parallelism", "prompt batching",
                        "automatic mixed precision", "selective activation recomputation"], "shoeybi2019megatron"),
    ("Alpa", _ALL, ["data parallelism", "model parallelism", "pipeline parallelism", "operator parallelism",
                    "automated model-parallel training", "prompt batching"], "zheng2022alpa"),
    ("Colossal AI", _ALL, ["data parallelism", "model parallelism", "pipeline parallelism",
                           "mixed precision training", "gradient accumulation",
                           "heterogeneous distributed training", "prompt batching", "quantization"],
     "li2023colossalai"),
    ("FairScale", _ALL, ["data parallelism", "model parallelism", "pipeline parallelism",
                         "activation checkpointing", "model offloading", "model scaling", "AdaScale optimization"],
     "fairscale2021"),
    ("Pax", _ALL, ["data parallelism", "model parallelism", "kernel optimizations"], "pax2023"),
    ("Composer", _ALL, ["fully sharded data parallelism", "elastic sharded checkpointing", "flash attention"],
     "mosaicml2023composer"),
    ("vLLM", _INFER, ["data parallelism", "model parallelism", "tensor parallelism", "PagedAttention",
                      "optimized CUDA kernels", "dynamic batching", "quantization"], "kwon2023vllm"),
    ("OpenLLM", (False, True, True), ["distributed fine-tuning and inference", _INTEGRATIONS, "Prometheus metrics",
                                      "token streaming"],
     "pham2023openllm"),
    ("Ray LLM", _INFER, ["distributed inference", "integration with Alpa", "prompt batching", "quantization",
                         "Prometheus metrics"], "rayllm2023"),
    ("MLC LLM", _INFER, ["distributed inference", "compiler acceleration", "prompt batching", "quantization"],
     "mlcllm2023"),
    ("Sax", _INFER, ["distributed inference", "serves PaxML, JAX and PyTorch models", "slice serving",
                     "Prometheus metrics"], "sax2023"),
    ("Mosec", _INFER, ["distributed inference", "dynamic batching", "Rust-based task coordinator",
                       "Prometheus metrics"], "yang2021mosec"),
    ("LLM Foundry", _INFER, ["distributed inference", "dynamic batching", "prompt batching"],
     "mosaicml2023llmfoundry"),
])

_SERVING = ("orca-iteration-level-scheduling", "pagedattention")
_SHARDING = ("data-parallelism", "zero-stages-1-2-3", "fsdp")
_PRECISION = ("amp-fp16-with-loss-scaling-and-fp32-mast", "bf16")
_QUANT = ("absmax-and-zero-point-round-to-nearest-s", "llm-int8", "gptq", "awq", "smoothquant")
_KERNELS = ("flash-decoding-split-kv", "pagedattention", "smoothquant", "n-m-2-4-semi-structured")
_SYSTEM = "a serving-system feature (deployment, operations), not an efficiency technique of the survey's taxonomy"
_NOT_HERE = "not in the survey's taxonomy of techniques; the book does not build it"
FEATURES: dict[str, Feature] = {f.name: f for f in [
    Feature("data parallelism", _SHARDING, "gradients all-reduced across replicas; ZeRO and FSDP shard it"),
    Feature("fully sharded data parallelism", ("fsdp", "zero-stages-1-2-3"), "ZeRO stage 3 is the same idea"),
    Feature("model parallelism", ("tensor-parallelism", "pipeline-parallelism-micro-batch-schedul"),
            "tensor and pipeline parallelism"),
    Feature("tensor parallelism", ("tensor-parallelism",), "Megatron-style column/row splits"),
    Feature("pipeline parallelism", ("pipeline-parallelism-micro-batch-schedul",), "micro-batch schedules"),
    Feature("operator parallelism", ("tensor-parallelism",), "intra-operator parallelism is tensor parallelism"),
    Feature("automated model-parallel training", (), "Alpa's search over parallel plans (" + _NOT_HERE + ")"),
    Feature("heterogeneous distributed training", ("zero-offload",), "optimizer state and step on the CPU"),
    Feature("distributed inference", ("tensor-parallelism",),
            "splitting one model across devices at inference time"),
    Feature("distributed fine-tuning and inference", ("tensor-parallelism", "zero-stages-1-2-3"),
            "the training and inference sharding of the other rows"),
    Feature("prompt batching", _SERVING, "the serving engine batches requests of different lengths"),
    Feature("dynamic batching", _SERVING, "iteration-level (continuous) batching"),
    Feature("PagedAttention", ("pagedattention",), "the paged KV cache of the serving engine"),
    Feature("token streaming", ("orca-iteration-level-scheduling",), "the engine yields tokens as they come"),
    Feature("quantization", _QUANT, "weight-only and weight-activation quantization"),
    Feature("compression", ("sparsegpt", "wanda", "gptq", "logit-kd-forward-kl-with-temperature"),
            "pruning, quantization, distillation"),
    Feature("kernel optimizations", _KERNELS, "Triton kernels beside their PyTorch references"),
    Feature("optimized CUDA kernels", _KERNELS, "Triton kernels (vLLM's CUDA ones are not reproduced)"),
    Feature("flash attention", ("flashattention-flashattention-2",), "IO-aware exact attention"),
    Feature("mixture of experts", ("switch-top-1-with-load-balancing-loss", "mixtral-8x7b-top-2",
                                   "deepspeed-moe-pr-moe"), "routers, capacity, PR-MoE"),
    Feature("automatic mixed precision", _PRECISION, "fp16 with loss scaling, bf16"),
    Feature("mixed precision training", _PRECISION, "fp16 with loss scaling, bf16"),
    Feature("selective activation recomputation", (), "activation checkpointing is a torch one-liner "
            "(torch.utils.checkpoint); the book measures no version of it"),
    Feature("activation checkpointing", (), "torch.utils.checkpoint; the book measures no version of it"),
    Feature("gradient accumulation", (), "a loop over micro-batches before the optimizer step; not a chapter"),
    Feature("model offloading", ("flexgen-offloading-cost-model-4-bit-kv", "zero-offload",
                                 "edgemoe-expert-offloading"), "weights and KV cache on the CPU, fetched on use"),
    Feature("model scaling", (), "FairScale's scaling utilities; " + _NOT_HERE),
    Feature("AdaScale optimization", (), "AdaScale SGD's learning-rate rule for large batches; " + _NOT_HERE),
    Feature("elastic sharded checkpointing", (), "fault tolerance of training jobs; " + _NOT_HERE),
    Feature("compiler acceleration", (), "MLC LLM's TVM compilation; " + _NOT_HERE),
    Feature("integration with Alpa", (), _SYSTEM),
    Feature(_INTEGRATIONS, (), _SYSTEM),
    Feature("Prometheus metrics", (), _SYSTEM),
    Feature("serves PaxML, JAX and PyTorch models", (), _SYSTEM),
    Feature("slice serving", (), _SYSTEM),
    Feature("Rust-based task coordinator", (), _SYSTEM),
]}


def _catalog() -> dict[str, Entry]:
    return {e.id: e for e in load_catalog()}


def feature_links(catalog: dict[str, Entry] | None = None) -> list[dict]:
    """One dict per feature: its frameworks, the implemented catalog ids and their chapters, or why not built.

    A linked id that is missing from the catalog is reported under ``unknown_ids`` (a test keeps it empty).
    """
    catalog = _catalog() if catalog is None else catalog
    rows = []
    for feature in FEATURES.values():
        built = [catalog[i] for i in feature.catalog_ids if i in catalog and catalog[i].implemented]
        planned = [i for i in feature.catalog_ids if i in catalog and not catalog[i].implemented]
        chapters = list(dict.fromkeys(e.chapter for e in built))
        status = "built" if built else ("planned" if planned else "not built")
        rows.append({"feature": feature.name, "status": status, "catalog ids": [e.id for e in built],
                     "chapters": chapters, "planned ids": planned, "note": feature.note,
                     "unknown_ids": [i for i in feature.catalog_ids if i not in catalog],
                     "frameworks": [f.name for f in FRAMEWORKS if feature.name in f.features]})
    return rows


def feature_matrix() -> tuple[list[str], list[str], list[list[bool]]]:
    """(framework names, feature names, has[framework][feature]): Table 2's features as a boolean matrix,
    features ordered by how many frameworks list them (most first)."""
    names = sorted(FEATURES, key=lambda f: (-sum(f in fw.features for fw in FRAMEWORKS), f.lower()))
    return ([fw.name for fw in FRAMEWORKS], names, [[f in fw.features for f in names] for fw in FRAMEWORKS])
