"""Low-rank approximation (survey §2.1.3): truncated SVD (plain and whitened), TensorGPT, LoSparse."""

from effref.lowrank.losparse import LoSparseLinear, losparse_compress_model, losparse_factorize
from effref.lowrank.svd import LowRankLinear, rank_for_ratio, svd_compress_model, svd_factorize, truncated_svd
from effref.lowrank.tensor_train import TTEmbedding, tt_compress_embedding, tt_parameter_count, tt_svd

__all__ = ["LoSparseLinear", "LowRankLinear", "TTEmbedding", "losparse_compress_model", "losparse_factorize",
           "rank_for_ratio", "svd_compress_model", "svd_factorize", "truncated_svd", "tt_compress_embedding",
           "tt_parameter_count", "tt_svd"]
