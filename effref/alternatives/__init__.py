"""Transformer alternatives (survey §2.5.4): sequence models without attention's growing KV cache.

- ``recurrent``: the shared machinery: the linear recurrence h_t = a_t h_{t−1} + b_t as a loop and as a parallel
  (odd–even) scan, causal long convolutions (direct and FFT), and ``RecurrentLM`` (generation from a fixed-size
  state, exact save / load).
- ``mamba``: Mamba's selective state-space model (Gu & Dao 2023), block and language model.
- ``rwkv``: RWKV-4 (Peng et al. 2023): time mixing with the WKV operator, channel mixing, token shift.
- ``s4``: S4's (Gu et al. 2022) and DSS's (Gupta et al. 2022) convolution kernels from the state-space parameters.
- ``hyena``: the Hyena operator (Poli et al. 2023): implicit long filters and gates.
- ``megabyte``: MEGABYTE (Yu et al. 2023): a global model over byte patches and a local model inside each patch.
- ``mixer_lm``: Hyena's operator or RetNet's retention as the token mixer of a small pre-norm language model.
"""

from effref.alternatives.hyena import HyenaOperator
from effref.alternatives.mamba import Mamba, MambaConfig, selective_scan_parallel, selective_scan_sequential
from effref.alternatives.megabyte import Megabyte, MegabyteConfig, attention_pairs
from effref.alternatives.mixer_lm import MixerLM, MixerLMConfig
from effref.alternatives.recurrent import (RecurrentLM, causal_conv_direct, causal_conv_fft, scan_parallel,
                                           scan_sequential)
from effref.alternatives.rwkv import RWKV, RWKVConfig, wkv_parallel, wkv_recurrent
from effref.alternatives.s4 import dss_kernel, hippo_dplr, s4_kernel, ssm_convolve, ssm_recurrent

__all__ = ["RWKV", "HyenaOperator", "Mamba", "MambaConfig", "Megabyte", "MegabyteConfig", "MixerLM", "MixerLMConfig",
           "RWKVConfig", "RecurrentLM", "attention_pairs", "causal_conv_direct", "causal_conv_fft", "dss_kernel",
           "hippo_dplr", "s4_kernel", "scan_parallel", "scan_sequential", "selective_scan_parallel",
           "selective_scan_sequential", "ssm_convolve", "ssm_recurrent", "wkv_parallel", "wkv_recurrent"]
