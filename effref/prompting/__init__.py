"""Prompt engineering and prompt compression (survey §3.2): what goes into the prompt, and how few tokens of it
are needed.

- ``lm``: the calls every method makes on our Llama — hidden states and mean-pooled text embeddings, a forward
  from embeddings under any attention mask (and after cached keys/values), per-token information, and
  single-token answer log-probabilities.
- ``demonstrations``: KATE nearest neighbours, Vote-k selective annotation, ordering by distance and by
  entropy probing (GlobalE / LocalE), and the seeded random baseline.
- ``reasoning``: chain-of-thought prompts, self-consistency (sample and majority-vote) through the serving
  engine, and Skeleton-of-Thought (outline, then every point expanded in one batched decode).
- ``compression``: LLMLingua — budget controller, coarse demonstration selection, iterative token-level
  compression with protected spans.
- ``gist``: gist tokens — the gist attention mask, training, and the compressed gist cache.
- ``autoprompt``: AutoPrompt's gradient-guided discrete trigger search.
"""

from effref.prompting.autoprompt import TriggerSearch, autoprompt
from effref.prompting.compression import (
                                          CompressedPrompt,
                                          budget,
                                          compress_prompt,
                                          compress_tokens,
                                          protected_mask,
                                          select_tokens,
)
from effref.prompting.demonstrations import (
                                          cosine_similarity_matrix,
                                          kate,
                                          knn_graph,
                                          label_entropies,
                                          order_by_distance,
                                          order_by_entropy,
                                          random_demonstrations,
                                          vote_k,
)
from effref.prompting.gist import (
                                          GistTokens,
                                          continue_after,
                                          gist_cache,
                                          gist_logits,
                                          gist_loss,
                                          gist_mask,
                                          train_gist,
)
from effref.prompting.lm import (
                                          choice_logprobs,
                                          embed_texts,
                                          forward_embeds,
                                          hidden_states,
                                          run_layers,
                                          token_information,
)
from effref.prompting.reasoning import (
                                          Exemplar,
                                          SkeletonResult,
                                          chain_of_thought_prompt,
                                          extract_answer,
                                          majority_vote,
                                          parse_outline,
                                          self_consistency,
                                          skeleton_of_thought,
                                          zero_shot_cot_prompt,
)

__all__ = ["CompressedPrompt", "Exemplar", "GistTokens", "SkeletonResult", "TriggerSearch", "autoprompt", "budget",
           "chain_of_thought_prompt", "choice_logprobs", "compress_prompt", "compress_tokens", "continue_after",
           "cosine_similarity_matrix", "embed_texts", "extract_answer", "forward_embeds", "gist_cache",
           "gist_logits", "gist_loss", "gist_mask", "hidden_states", "kate", "knn_graph", "label_entropies",
           "majority_vote", "order_by_distance", "order_by_entropy", "parse_outline", "protected_mask",
           "random_demonstrations", "run_layers", "select_tokens", "self_consistency", "skeleton_of_thought",
           "token_information", "train_gist", "vote_k", "zero_shot_cot_prompt"]
