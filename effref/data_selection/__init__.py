"""Data selection (survey §3.1): which text to pre-train on, which examples to fine-tune on.

Pre-training: DSIR importance resampling (``dsir``), DoReMi domain reweighting (``doremi``), perplexity
filtering with a reference model (``perplexity_filter``), and the tiny next-byte model they are measured with
(``proxy``). Fine-tuning: Instruction Mining's linear quality rule
(``instruction_mining``), AlpaGasus-style grading (``alpagasus``), retrieval of task neighbours
(``retrieval``), TS-DShapley data values (``ts_dshapley``). ``common`` holds the shared checks and the
Gumbel top-k sampler.
"""

from effref.data_selection.alpagasus import (
    LIKELIHOOD_PROMPT,
    RATING_PROMPT,
    alpagasus_filter,
    grader_scores,
    rating_token_ids,
    response_log_likelihood,
)
from effref.data_selection.common import gumbel_top_k, k_from_ratio, top_k_indices
from effref.data_selection.doremi import DoReMiResult, doremi_update, doremi_weights
from effref.data_selection.dsir import (
    DSIRSelection,
    bag_of_ngrams_log_probs,
    dsir_select,
    hashed_ngram_features,
    importance_log_weights,
    ngram_bucket,
)
from effref.data_selection.instruction_mining import QualityRule, fit_quality_rule, select_by_quality
from effref.data_selection.perplexity_filter import byte_perplexities, perplexity_filter
from effref.data_selection.proxy import (
    TinyNextTokenLM,
    mean_loss,
    mixture_batch,
    sample_windows,
    text_bytes,
    train_lm,
)
from effref.data_selection.retrieval import retrieve_for_task
from effref.data_selection.ts_dshapley import centroid_accuracy_value, exact_shapley, tmc_shapley, ts_dshapley

__all__ = [
    "LIKELIHOOD_PROMPT", "RATING_PROMPT", "DSIRSelection", "DoReMiResult", "QualityRule", "TinyNextTokenLM",
    "alpagasus_filter", "bag_of_ngrams_log_probs", "byte_perplexities", "centroid_accuracy_value", "doremi_update", "doremi_weights",
    "dsir_select", "exact_shapley", "fit_quality_rule", "grader_scores", "gumbel_top_k", "hashed_ngram_features",
    "importance_log_weights", "k_from_ratio", "mean_loss", "mixture_batch", "ngram_bucket", "perplexity_filter", "rating_token_ids",
    "response_log_likelihood", "retrieve_for_task", "sample_windows", "select_by_quality", "text_bytes",
    "tmc_shapley", "top_k_indices", "train_lm", "ts_dshapley",
]
