"""Model growth (survey §2.2, "scaling models"): start a large model from a small trained one.

``transformer`` is the small BERT/GPT-style model all of them grow (post-LN, pre-LN or norm-free), ``bert2bert``
widens it (FPI, function-preserving; AKI, with the next layer's knowledge), ``stacking`` deepens it (progressive
stacking, or identity blocks) and ``ligo`` learns a linear operator that does both.
"""

from effref.pretraining.growth.bert2bert import WidthMaps, aki_widen, fpi_widen, width_maps
from effref.pretraining.growth.ligo import LiGO
from effref.pretraining.growth.stacking import grow_depth
from effref.pretraining.growth.transformer import TinyTransformer, TinyTransformerConfig

__all__ = ["LiGO", "TinyTransformer", "TinyTransformerConfig", "WidthMaps", "aki_widen", "fpi_widen", "grow_depth",
           "width_maps"]
