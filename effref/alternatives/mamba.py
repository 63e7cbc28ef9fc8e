"""Mamba: a language model of selective state-space blocks, with a constant-size state instead of a KV cache.

Paper: Gu & Dao (2023), "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752 —
§2 Eq. 1–4 (SSM and its discretisation), §3.2 Algorithm 2 (the selection mechanism), §3.3.2 (the scan), §3.4 and
Figure 3 (the block), §3.6 (initialisation).
Implements, for every channel d of the inner width D and state index n:
  Δ_t = softplus(W_Δ (W_R u_t) + b_Δ)              input-dependent step, through a rank-R bottleneck (Alg. 2)
  B_t = W_B u_t,  C_t = W_C u_t                    input-dependent, shared by all channels (Alg. 2)
  Ā_t = exp(Δ_t A),  B̄_t = Δ_t B_t                 Eq. 4 (zero-order hold) for A; for B the simplified step
                                                    Δ B of the authors' code and of transformers
  h_t = Ā_t ⊙ h_{t−1} + B̄_t u_t,  y_t = C_t · h_t + D ⊙ u_t                          Eq. 2a, 2b
as a readable loop over t (``selective_scan_sequential``) and as a doubling scan over all t at once
(``selective_scan_parallel``, via ``recurrent.scan_parallel``); the block (Figure 3)
  [u, z] = in_proj(RMSNorm(x)),  u ← SiLU(causal depthwise conv of width d_conv over u),
  x ← x + out_proj(SSM(u) ⊙ SiLU(z));
the language model embedding → blocks → RMSNorm → LM head (tied to the embedding), and its recurrent state:
per layer the last d_conv − 1 convolution inputs and h, so a generated token costs the same at any position.
Weights and outputs equal transformers' ``MambaForCausalLM`` (``Mamba.from_hf``; its PyTorch path).
Glossary: d = d_model · D = expand · d (inner width) · N = d_state · R = dt_rank = ⌈d / 16⌉ · A (D, N) stored as
          A_log, A = −exp(A_log) · Δ (B, T, D) step · u SSM input · z gate · d_conv convolution width.
Left out: the hardware-aware kernel (scan in SRAM, recomputation in the backward pass), padding masks, complex A
          (S4D-Lin), Mamba-2's scalar-times-identity A and chunked matrix form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from effref.alternatives.recurrent import RecurrentLM, scan_parallel
from effref.models.llama import RMSNorm

if TYPE_CHECKING:
    import transformers

SCANS = ("parallel", "sequential")


@dataclass
class MambaConfig:
    vocab_size: int = 50280
    d_model: int = 768
    n_layers: int = 24
    d_state: int = 16  # N
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # D = expand · d_model
    dt_rank: int | None = None  # R; None: ⌈d_model / 16⌉
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False  # biases on in_proj and out_proj
    tie_embeddings: bool = True
    scan: str = "parallel"  # how a forward pass over T > 1 tokens runs the SSM: "parallel" or "sequential"
    dt_min: float = 1e-3  # initial Δ is log-uniform in [dt_min, dt_max] (§3.6)
    dt_max: float = 0.1

    def __post_init__(self) -> None:
        for name, fix in (("d_state", "Mamba uses 16"), ("d_conv", "Mamba uses 4"), ("expand", "Mamba uses 2"),
                          ("vocab_size", "the tokenizer's size"), ("d_model", "e.g. 768"),
                          ("n_layers", "e.g. 24")):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer ({fix})")
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"dt_rank={self.dt_rank!r} must be a positive integer (None: ⌈d_model / 16⌉)")
        if self.scan not in SCANS:
            raise ValueError(f"scan={self.scan!r} is not known; use one of {SCANS}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min={self.dt_min}, dt_max={self.dt_max}: need 0 < dt_min <= dt_max")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @classmethod
    def from_hf(cls, hf_config: transformers.MambaConfig) -> MambaConfig:
        """Read a transformers ``MambaConfig``; settings this module does not implement are refused by name."""
        if getattr(hf_config, "model_type", None) != "mamba":
            raise ValueError(f"hf_config is a {type(hf_config).__name__} (model_type "
                             f"{getattr(hf_config, 'model_type', None)!r}), not a Mamba config; Mamba-2 and "
                             "hybrids (Jamba, Zamba) differ in A and in their layers")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"hf_config.hidden_act={hf_config.hidden_act!r} is not supported; Mamba's block "
                             "uses silu")
        if hf_config.intermediate_size != hf_config.expand * hf_config.hidden_size:
            raise ValueError(f"hf_config.intermediate_size={hf_config.intermediate_size} is not expand · "
                             f"hidden_size = {hf_config.expand * hf_config.hidden_size}; only that width is "
                             "implemented")
        return cls(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
                   n_layers=hf_config.num_hidden_layers, d_state=hf_config.state_size,
                   d_conv=hf_config.conv_kernel, expand=int(hf_config.expand),
                   dt_rank=int(hf_config.time_step_rank), norm_eps=hf_config.layer_norm_epsilon,
                   conv_bias=hf_config.use_conv_bias, proj_bias=hf_config.use_bias,
                   tie_embeddings=bool(hf_config.tie_word_embeddings))


def _discretise(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā = exp(Δ A) and B̄ u = Δ B u for all t at once, each (batch, T, D, N)."""
    a = torch.exp(delta[..., None] * A)  # (batch, T, D, N)   Eq. 4: Ā = exp(ΔA)
    b = (delta * u)[..., None] * B[:, :, None, :]  # (batch, T, D, N)   B̄ u = Δ B u
    return a, b


def selective_scan_sequential(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor,
                              h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective SSM as a recurrence, one time step after the other (Algorithm 2 read literally).

    u, delta: (batch, T, D); A: (D, N); B, C: (batch, T, N); D: (D,); h0: (batch, D, N) or None (zeros).
    Returns y (batch, T, D) and the last state h_{T−1} (batch, D, N). Memory stays O(batch · D · N).
    """
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if h0 is None else h0  # (batch, D, N)
    ys = []
    for t in range(u.shape[1]):
        a_t = torch.exp(delta[:, t, :, None] * A)  # (batch, D, N)   Ā_t = exp(Δ_t A)
        b_t = (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]  # (batch, D, N)   B̄_t u_t
        h = a_t * h + b_t  # (batch, D, N)   Eq. 2a
        ys.append((h @ C[:, t, :, None])[..., 0] + D * u[:, t])  # (batch, D)   Eq. 2b: C_t · h_t + D u_t
    return torch.stack(ys, dim=1), h  # (batch, T, D), (batch, D, N)


def selective_scan_parallel(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            C: torch.Tensor, D: torch.Tensor,
                            h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same y and last state as :func:`selective_scan_sequential`, all time steps in ⌈log₂ T⌉ tensor
    operations (``recurrent.scan_parallel``); it holds every h_t, O(batch · T · D · N) memory."""
    a, b = _discretise(u, delta, A, B)  # (batch, T, D, N) each
    h = scan_parallel(a, b, h0)  # (batch, T, D, N): every h_t
    y = (h @ C[..., None])[..., 0] + D * u  # (batch, T, D)
    return y, h[:, -1]


class MambaState:
    """The recurrent state of every layer: the convolution's last d_conv − 1 inputs and the SSM state h.

    Its size, layers · batch · D · (d_conv − 1 + N) numbers, does not depend on how many tokens it summarises.
    """

    def __init__(self, cfg: MambaConfig, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size, self.length = batch_size, 0  # length: tokens summarised so far
        self.conv = [torch.zeros(batch_size, cfg.d_inner, cfg.d_conv - 1, dtype=dtype, device=device)
                     for _ in range(cfg.n_layers)]  # (B, D, d_conv − 1) per layer
        self.ssm = [torch.zeros(batch_size, cfg.d_inner, cfg.d_state, dtype=torch.float32, device=device)
                    for _ in range(cfg.n_layers)]  # (B, D, N) per layer, float32 like the scan

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)


class MambaMixer(nn.Module):
    """The selective SSM with its projections, convolution and gate (Figure 3, without the norm and residual)."""

    def __init__(self, cfg: MambaConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        D, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * D, bias=cfg.proj_bias)  # → u and z
        self.conv1d = nn.Conv1d(D, D, cfg.d_conv, groups=D, bias=cfg.conv_bias)  # depthwise: one filter a channel
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)  # → Δ (rank R), B, C
        self.dt_proj = nn.Linear(R, D, bias=True)  # W_Δ, b_Δ
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1))  # (D, N)
        self.D = nn.Parameter(torch.ones(D))  # skip connection
        self.out_proj = nn.Linear(D, cfg.d_model, bias=cfg.proj_bias)
        with torch.no_grad():  # §3.6: Δ starts log-uniform in [dt_min, dt_max]; b_Δ = softplus⁻¹(Δ)
            nn.init.uniform_(self.dt_proj.weight, -R**-0.5, R**-0.5)
            dt = torch.exp(torch.rand(D) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.out_proj.weight /= math.sqrt(cfg.n_layers)  # residual branches scaled down with depth

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        T, k = x.shape[1], self.cfg.d_conv
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, D) each
        # causal depthwise convolution: channel d at time t sees u_{t−k+1..t}; before t = 0, zeros or the state
        u = u.transpose(1, 2)  # (B, D, T)
        past = u.new_zeros(*u.shape[:2], k - 1) if state is None else state.conv[self.layer]  # (B, D, k − 1)
        u = torch.cat([past.to(u.dtype), u], dim=-1)  # (B, D, k − 1 + T)
        if state is not None:
            state.conv[self.layer] = u[:, :, u.shape[-1] - (k - 1):]  # (B, D, k − 1)
        # what self.conv1d computes, written out (its CPU path is slow on the tiny inputs of a decoding step)
        windows = u.unfold(-1, k, 1)  # (B, D, T, k): window t holds u_{t−k+1} … u_t
        u = (windows * self.conv1d.weight).sum(-1)  # (B, D, T): weight (D, 1, k), one filter per channel
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias[:, None]
        u = F.silu(u).transpose(1, 2)  # (B, T, D)
        dt, B, C = self.x_proj(u).split([self.cfg.dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).float()  # (B, T, D)   Δ > 0
        A = -torch.exp(self.A_log.float())  # (D, N)   A < 0: the state decays
        h0 = None if state is None else state.ssm[self.layer]
        scan = selective_scan_sequential if self.cfg.scan == "sequential" or T == 1 else selective_scan_parallel
        y, h = scan(u.float(), delta, A, B.float(), C.float(), self.D.float(), h0)  # (B, T, D), (B, D, N)
        if state is not None:
            state.ssm[self.layer] = h
        return self.out_proj((y * F.silu(z.float())).to(x.dtype))  # (B, T, d_model)


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig, layer: int):
        super().__init__()
        self.norm, self.mixer = RMSNorm(cfg.d_model, cfg.norm_eps), MambaMixer(cfg, layer)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state)  # (B, T, d_model)


class Mamba(RecurrentLM):
    """A Mamba language model: ``model(ids)`` for logits, ``model(ids, state)`` to continue a sequence."""

    config_type = MambaConfig

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(MambaBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_state(self, batch_size: int) -> MambaState:
        """An empty state for ``batch_size`` sequences: zeros, as before the first token."""
        w = self.embed.weight
        return MambaState(self.cfg, batch_size, dtype=w.dtype, device=w.device)

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with a state, the ids continue what it summarises and the
        state is advanced past them."""
        self.check_ids(input_ids)
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state.batch_size={state.batch_size} but input_ids has B={input_ids.shape[0]}; "
                             "create the state with model.new_state(B)")
        x = self.embed(input_ids)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, state)  # (B, T, d_model)
        if state is not None:
            state.length += input_ids.shape[1]
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    @classmethod
    def from_hf(cls, hf_model: transformers.MambaForCausalLM) -> Mamba:
        """Our model with the weights (dtype, device) of a transformers ``MambaForCausalLM``."""
        config = getattr(hf_model, "config", None)
        if getattr(config, "model_type", None) != "mamba" or not hasattr(hf_model, "backbone"):
            raise ValueError(f"hf_model must be a transformers MambaForCausalLM, got {type(hf_model).__name__}")
        weight = hf_model.get_input_embeddings().weight
        model = cls(MambaConfig.from_hf(config)).to(device=weight.device, dtype=weight.dtype)
        renames = {"backbone.embeddings.": "embed.", "backbone.layers.": "layers.", "backbone.norm_f.": "norm."}
        state = {}
        for name, tensor in hf_model.state_dict().items():
            old = next((o for o in renames if name.startswith(o)), None)
            state[name if old is None else renames[old] + name[len(old):]] = tensor
        if model.cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval()
