"""Efficient pre-training (survey §2.2): mixed precision and optimizers, each a from-scratch module.

``mixed_precision`` (FP16 with dynamic loss scaling and FP32 master weights, the BF16 path), ``adamw`` (the
baseline and its memory bill), ``lion`` and ``sophia`` (the survey's two optimizers), ``state`` (bytes per
parameter, measured) and ``training`` (the loop they all run through).
"""

from effref.pretraining.adamw import AdamW, AdamWConfig
from effref.pretraining.lion import Lion, LionConfig
from effref.pretraining.mixed_precision import (
                                                CastReport,
                                                DynamicLossScaler,
                                                LossScalerConfig,
                                                MixedPrecision,
                                                MixedPrecisionConfig,
                                                cast_report,
                                                format_limits,
                                                lost_update_fraction,
)
from effref.pretraining.sophia import Sophia, SophiaConfig, gnb_hessian, hutchinson_hessian
from effref.pretraining.state import TrainingBytes, optimizer_state_bytes, training_bytes
from effref.pretraining.training import PretrainConfig, PretrainResult, pretrain, state_bytes_after_step

__all__ = ["AdamW", "AdamWConfig", "CastReport", "DynamicLossScaler", "Lion", "LionConfig", "LossScalerConfig",
           "MixedPrecision", "MixedPrecisionConfig", "PretrainConfig", "PretrainResult", "Sophia", "SophiaConfig",
           "TrainingBytes", "cast_report", "format_limits", "gnb_hessian", "hutchinson_hessian",
           "lost_update_fraction", "optimizer_state_bytes", "pretrain", "state_bytes_after_step", "training_bytes"]
