"""Knowledge distillation (survey §2.1.4): logit KD, reverse KL and MiniLLM's policy gradient, GKD, sequence-level KD, step-by-step."""

from effref.distillation.losses import check_vocab, forward_kl, generalized_jsd, reverse_kl, sequence_nll
from effref.distillation.minillm import minillm_surrogate, mixed_sample
from effref.distillation.students import every_kth, layer_dropped_student
from effref.distillation.targets import TeacherTargets, cache_teacher_targets, teacher_generations
from effref.distillation.trainer import OBJECTIVES, DistillConfig, DistillResult, distill

__all__ = ["OBJECTIVES", "DistillConfig", "DistillResult", "TeacherTargets", "cache_teacher_targets",
           "check_vocab", "distill", "every_kth", "forward_kl", "generalized_jsd", "layer_dropped_student",
           "minillm_surrogate", "mixed_sample", "reverse_kl", "sequence_nll", "teacher_generations"]
