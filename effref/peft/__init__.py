"""Parameter-efficient fine-tuning methods, each a from-scratch module (see effref/peft/<method>.py)."""

from effref.peft.core import (
                              find_linears,
                              freeze_base,
                              load_trainable,
                              load_trainable_file,
                              merge_and_unload,
                              save_trainable,
                              trainable_state_dict,
)
from effref.peft.lora import (
                              LoraConfig,
                              LoraLinear,
                              apply_lora,
                              apply_lora_fa,
                              load_lora_state_dict,
                              lora_state_dict,
                              merge_lora,
                              unmerge_lora,
)

__all__ = ["LoraConfig", "LoraLinear", "apply_lora", "apply_lora_fa", "find_linears", "freeze_base",
           "load_lora_state_dict", "load_trainable", "load_trainable_file", "lora_state_dict", "merge_and_unload", "merge_lora",
           "save_trainable", "trainable_state_dict", "unmerge_lora"]
