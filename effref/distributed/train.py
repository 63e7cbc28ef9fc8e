"""One training script for 1..N processes: our from-scratch engines to read, PyTorch's and DeepSpeed's to scale.

    python -m effref.distributed.train --engine effref-zero3 --steps 20            # one process
    torchrun --nproc-per-node 4 -m effref.distributed.train --engine effref-zero3  # four, unchanged
    torchrun --nproc-per-node 4 -m effref.distributed.train --engine fsdp2         # PyTorch's FSDP2
    torchrun --nproc-per-node 2 -m effref.distributed.train --engine deepspeed-zero2

Every engine trains the same byte-level transformer (``TinyLM``) on the same batches: each step draws a global
batch of ``batch`` windows from one seeded generator (identical on every rank), and rank r trains on its slice
(``split_batch``), so the loss curve does not depend on the number of processes or the engine — only on float
rounding. ``train`` is the same run as a function, ``compare_engines`` several of them in one job (tests and the chapter
start them with ``run_ranks``).
Engines: ``single`` (no distribution, torch's AdamW), ours — ``effref-dp``, ``effref-zero0``…``effref-zero3``,
``effref-fsdp`` (prefetch), ``effref-offload`` (ZeRO-2 with the optimizer on the CPU) with our AdamW — and the
real ones with ``torch.optim.AdamW``: ``ddp``, ``zero-redundancy`` (DDP + ZeroRedundancyOptimizer, ZeRO-1),
``fsdp2`` (``fully_shard`` on each block, then the model) and ``deepspeed-zero1``/``2``/``3``.
Left out: checkpoint saving/resuming, learning-rate schedules, evaluation, mixed precision.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effref.distributed.checkpointing import checkpoint_modules
from effref.distributed.data_parallel import DataParallel, split_batch
from effref.distributed.fsdp import FSDPEngine
from effref.distributed.launch import init_distributed
from effref.distributed.offload import ZeroOffload
from effref.distributed.zero import ZeroEngine
from effref.pretraining.adamw import AdamW, AdamWConfig

OURS = ("effref-dp", "effref-zero0", "effref-zero1", "effref-zero2", "effref-zero3", "effref-fsdp",
        "effref-offload")
THEIRS = ("ddp", "zero-redundancy", "fsdp2", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")
ENGINES = ("single", *OURS, *THEIRS)


@dataclass(frozen=True)
class TrainConfig:
    engine: str = "effref-zero2"
    steps: int = 20
    batch: int = 8  # global batch, windows per step over all ranks
    seq_len: int = 32  # T, bytes per window
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    corpus: str = "sample"  # any effref.data corpus ("austen" once fetched)
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} is not known; use one of {ENGINES}")
        for name in ("steps", "batch", "seq_len", "d_model", "n_layers", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive int")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a 4× GELU MLP, each with a residual."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        # no bias on q, k, v: a key bias cancels in the softmax, so its gradient is rounding noise, which Adam's
        # normalisation would blow up to full-size steps that differ from run to run
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model, bias=False), nn.Linear(d_model, d_model)
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d / H)
        x = x + self.proj(attended.transpose(1, 2).reshape(B, T, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """Byte-level language model: embeddings, ``n_layers`` blocks (the sharding units), a norm and a head."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, cfg.d_model)
        self.position = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.norm, self.head = nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) bytes -> (B, T, 256) logits
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(cfg: TrainConfig):
    """``cfg.steps`` global batches of (B, T + 1) byte windows, the same on every rank."""
    from effref.data import load_corpus

    data = torch.frombuffer(bytearray(load_corpus(cfg.corpus).train.encode("utf-8")), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        starts = torch.randint(len(data) - cfg.seq_len - 1, (cfg.batch,), generator=generator)
        yield torch.stack([data[s:s + cfg.seq_len + 1] for s in starts.tolist()])  # (B, T + 1)


def _deepspeed_engine(model: nn.Module, stage: int, cfg: TrainConfig, micro_batch: int):
    """DeepSpeed ZeRO ``stage`` on the process group we already joined, with torch's AdamW and no compiled ops."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed reads these; run_ranks does not set them
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():  # its shared-memory CPU all-reduce is a C++ extension built on first use;
        deepspeed.ops.__dict__["__compatible_ops__"] = {}  # gloo does that job, so it is reported unavailable
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips the gradient norm to 1.0 unless told otherwise
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg`` on this process group (or alone); return the global loss per step, the final parameters by
    name, this rank's model-state bytes (our ZeRO engines) and the seconds per step."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.engine != "single" and not distributed:
        raise RuntimeError(f"engine={cfg.engine!r} needs a process group: call init_distributed() or use run_ranks")
    if cfg.engine == "single" and world > 1:
        raise ValueError(f"engine='single' trains one process, not {world}; pick a distributed engine")
    if cfg.batch % world:
        raise ValueError(f"batch={cfg.batch} does not split over {world} processes; use a multiple of {world}")
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg)
    if cfg.checkpoint_activations:
        checkpoint_modules(list(model.blocks))
    ours = lambda params: AdamW(params, AdamWConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
    theirs = lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, optimizer, units = model, None, list(model.blocks)
    if cfg.engine == "single":
        optimizer = theirs(model.parameters())
    elif cfg.engine == "effref-dp":
        engine, optimizer = DataParallel(model), ours(model.parameters())
    elif cfg.engine.startswith("effref-zero"):
        engine = ZeroEngine(model, int(cfg.engine[-1]), ours, units=units)
    elif cfg.engine == "effref-fsdp":
        engine = FSDPEngine(model, ours, units=units)
    elif cfg.engine == "effref-offload":
        engine = ZeroOffload(model, ours, stage=2, units=units)
    elif cfg.engine in ("ddp", "zero-redundancy"):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        engine = nn.parallel.DistributedDataParallel(model)
        optimizer = theirs(model.parameters()) if cfg.engine == "ddp" else \
            ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                    weight_decay=cfg.weight_decay)
    elif cfg.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in units:
            fully_shard(block)
        fully_shard(model)
        optimizer = theirs(model.parameters())
    else:
        engine = _deepspeed_engine(model, int(cfg.engine[-1]), cfg, cfg.batch // world)

    losses, state_bytes, start = [], None, time.perf_counter()
    for window in batches(cfg):
        window = split_batch(window, rank, world)  # (B / N, T + 1)
        logits = engine(window[:, :-1])  # (B / N, T, 256)
        loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        if cfg.engine.startswith("deepspeed"):
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            (optimizer or engine).step()
            if isinstance(engine, ZeroEngine):  # between step and zero_grad: the gradients are still held
                state_bytes = engine.model_state_bytes()
            (optimizer or engine).zero_grad()
        global_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    seconds = (time.perf_counter() - start) / cfg.steps
    return {"losses": losses, "parameters": _full_parameters(cfg.engine, engine, model),
            "bytes": state_bytes, "seconds_per_step": seconds}


def compare_engines(cfg: TrainConfig, engines: list[str]) -> dict[str, dict]:
    """``train`` once per engine, one after another on this process group, the rest of ``cfg`` unchanged."""
    return {engine: train(replace(cfg, engine=engine)) for engine in engines}


def _full_parameters(name: str, engine, model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(engine, ZeroEngine):
        return engine.full_state_dict()
    if name == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if name == "deepspeed-zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(prog="effref.distributed.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    for field, value in asdict(defaults).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value,
                                **({"choices": ENGINES} if field == "engine" else {}))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    rank, world = init_distributed()
    result = train(cfg)
    if rank == 0:
        for step, loss in enumerate(result["losses"]):
            print(f"step {step:4d}  loss {loss:.4f}")
        print(f"{cfg.engine} on {world} process(es): {result['seconds_per_step'] * 1e3:.1f} ms/step")
    dist.destroy_process_group()
    return result["losses"]


if __name__ == "__main__":
    main()
