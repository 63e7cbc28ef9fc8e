"""Efficient pre-training (survey §2.2): mixed precision and optimizers, each a from-scratch module.

``mixed_precision`` (FP16 with dynamic loss scaling and FP32 master weights, the BF16 path), ``adamw`` (the
baseline and its memory bill), ``lion`` and ``sophia`` (the survey's two optimizers), ``state`` (bytes per
parameter, measured) and ``training`` (the loop they all run through); ``growth`` (bert2BERT's FPI and AKI,
progressive stacking, LiGO) starts a large model from a small trained one, and ``init_schemes`` (Fixup, SkipInit,
ReZero, DeepNorm) lets a deep one train without warm-up.
"""

from effref.pretraining.adamw import AdamW, AdamWConfig
from effref.pretraining.growth import (
    LiGO,
    TinyTransformer,
    TinyTransformerConfig,
    WidthMaps,
    aki_widen,
    fpi_widen,
    grow_depth,
    width_maps,
)
from effref.pretraining.init_schemes import (
    deepnorm,
    deepnorm_constants,
    fixup,
    post_ln,
    pre_ln,
    rezero,
    skipinit,
)
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

__all__ = ["AdamW", "AdamWConfig", "CastReport", "DynamicLossScaler", "LiGO", "Lion", "LionConfig",
           "LossScalerConfig", "MixedPrecision", "MixedPrecisionConfig", "PretrainConfig", "PretrainResult", "Sophia",
           "SophiaConfig", "TinyTransformer", "TinyTransformerConfig", "TrainingBytes", "WidthMaps", "aki_widen",
           "cast_report", "deepnorm", "deepnorm_constants", "fixup", "format_limits", "fpi_widen", "gnb_hessian",
           "grow_depth", "hutchinson_hessian", "lost_update_fraction", "optimizer_state_bytes", "post_ln", "pre_ln",
           "pretrain", "rezero", "skipinit", "state_bytes_after_step", "training_bytes", "width_maps"]
