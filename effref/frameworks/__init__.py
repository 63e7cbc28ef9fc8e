"""The survey's §4: LLM frameworks (Table 2) as data, and our implementations run side by side with the real
libraries that work on a CPU (peft, transformers, bitsandbytes, torchao, rwkv, lm-eval).

``table`` holds Table 2 and links each feature to the catalog entry and chapter that build it; ``sidebyside``,
``quant`` and ``harness`` run the comparisons (each returns rows, and a library that is missing or fails gives a
row that says why instead of an error); ``report`` gathers the book's recorded headline numbers and the Triton
kernels' measurements for the performance report.
"""

from effref.frameworks.harness import harness_scores, make_tasks, our_scores
from effref.frameworks.quant import METHODS, QuantRow, block_linear_bytes, nf4_codes_row, quantization_rows
from effref.frameworks.report import HEADLINES, headline_rows, kernel_checks, kernel_results, load_records
from effref.frameworks.sidebyside import (
                                          CUDA_ONLY,
                                          Row,
                                          architecture_rows,
                                          attention_rows,
                                          generation_rows,
                                          guarded,
                                          lora_rows,
                                          zero_rows,
)
from effref.frameworks.table import FEATURES, FRAMEWORKS, Feature, Framework, feature_links, feature_matrix

__all__ = ["CUDA_ONLY", "FEATURES", "FRAMEWORKS", "HEADLINES", "METHODS", "Feature", "Framework", "QuantRow", "Row",
           "architecture_rows", "attention_rows", "block_linear_bytes", "feature_links", "feature_matrix",
           "generation_rows", "guarded", "harness_scores", "headline_rows", "kernel_checks", "kernel_results",
           "load_records", "lora_rows", "make_tasks", "nf4_codes_row", "our_scores", "quantization_rows",
           "zero_rows"]
