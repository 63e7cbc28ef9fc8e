"""KV-cache eviction policies: keep a fixed budget of past keys/values per head, chosen by a rule.

Papers: Xiao, Tian, Chen, Han, Lewis (2024), "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453 — §3.2 (sink tokens + rolling window); Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré,
Barrett, Wang, Chen (2023), "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", arXiv:2306.14048 — §3, Algorithm 1 (greedy eviction by accumulated attention); Liu, Desai, Liao,
Wang, Xie, Xu, Kyrillidis, Shrivastava (2023), "Scissorhands: Exploiting the Persistence of Importance
Hypothesis for LLM KV Cache Compression at Test Time", arXiv:2305.17118 — §4 (history window, counters,
batch dropping).
Implements ``EvictingCache``, a ``KVCache`` our Llama uses unchanged: each call stores the T new keys after the
kept ones and returns kept + new (new last, as the model requires), so new tokens attend to up to budget + T
keys; then, in ``advance``, every (layer, sequence, KV head) keeps the ``budget`` entries its policy selects:
  StreamingLLM  the first ``sinks`` tokens ever seen + the most recent ``budget − sinks``;
  H2O           the ``recent`` newest + the ``budget − recent`` others with the largest accumulated attention
                F_j = Σ_steps mean_group_heads a(query → j)  (Algorithm 1 evicts the argmin one at a time; with
                one token over budget per step that is the same rule);
  Scissorhands  the ``recent`` newest are protected; each token counts the steps of the last ``history`` at
                which its attention (mean over the group's heads) was below the uniform share 1 / #keys; when
                over budget, the tokens with the highest counts go (ties: the older first), and ``batch_drop``
                = m > 1 drops m − 1 more so that compression runs less often.
Attention weights come from a forward pre-hook on every ``Attention`` module (installed once by ``for_model``;
inert for other caches) that hands the rotated queries to the cache; the cache recomputes a = softmax(qkᵀ/√d).
Glossary: B batch · H key/value heads · S kept + new keys · T new tokens · a attention probability · F H2O
          score · w ``history`` · m ``batch_drop`` · pos original position of every kept entry.
Left out: keeping positions inside the cache (StreamingLLM re-assigns RoPE positions within the window to go
          past the training length; our keys are stored already rotated at their true positions), fused
          kernels, and Scissorhands' 4-bit combination.
"""

from __future__ import annotations

import math

import torch

from effref.models.llama import Attention, KVCache, Llama, apply_rope, require_llama


class EvictingCache(KVCache):
    """Keeps at most ``budget`` past tokens per (layer, sequence, KV head); subclasses choose which."""

    needs_attention = False

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, d_head: int, budget: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget={budget!r} tokens per head must be an integer >= 1")
        super().__init__(n_layers, batch_size, n_kv_heads, d_head, budget + 1, dtype, device)
        self.budget, self.kept = budget, [0] * n_layers  # entries stored per layer (same for every head)
        self.pos = [torch.zeros(batch_size, n_kv_heads, budget + 1, dtype=torch.long, device=device)
                    for _ in range(n_layers)]  # (B, H, capacity) original positions of the entries
        self.queries: dict[int, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: Llama, batch_size: int = 1, **policy) -> EvictingCache:
        """A cache shaped for ``model`` (and, if the policy reads attention, the query hooks installed)."""
        require_llama(model, "model")
        if cls.needs_attention:
            install_query_hooks(model)
        w = model.embed.weight
        return cls(model.cfg.n_layers, batch_size, model.cfg.n_kv_heads, model.cfg.d_head, dtype=w.dtype,
                   device=w.device, **policy)

    def _grow(self, layer: int, size: int) -> None:
        """Make room for ``size`` entries (a long prefill needs more than budget + 1)."""
        extra = size - self.k[layer].shape[2]
        if extra > 0:
            for store in (self.k, self.v):
                store[layer] = torch.cat([store[layer], store[layer][:, :, :extra].new_zeros(
                    *store[layer].shape[:2], extra, store[layer].shape[3])], dim=2)
            for store in (self.pos, *self.stats()):
                store[layer] = torch.cat([store[layer], store[layer].new_zeros(*store[layer].shape[:-1], extra)], -1)

    def stats(self) -> list[list[torch.Tensor]]:
        """Per-layer tensors indexed by entry on their last dim, gathered along with the keys."""
        return []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, T = self.kept[layer], k.shape[2]
        self._grow(layer, start + T)
        self.k[layer][:, :, start:start + T] = k  # (B, H, T, d_head)
        self.v[layer][:, :, start:start + T] = v
        self.pos[layer][:, :, start:start + T] = torch.arange(self.length, self.length + T, device=k.device)
        self.kept[layer] = start + T
        keys, values = self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]  # (B, H, S, d_head)
        if self.needs_attention:
            if layer not in self.queries:
                raise RuntimeError(f"{type(self).__name__} needs attention weights; create it with "
                                   f"{type(self).__name__}.for_model(model, ...) so the query hooks exist")
            self.observe(layer, attention_weights(self.queries.pop(layer), keys))
        return keys, values

    @property
    def wants_queries(self) -> bool:
        return self.needs_attention

    def receive_queries(self, layer: int, q: torch.Tensor) -> None:
        """Called by the query hook with the rotated queries (B, n_heads, T, d_head) of ``layer``."""
        self.queries[layer] = q

    def observe(self, layer: int, attn: torch.Tensor) -> None:
        """Record attention (B, H, T, S): group-averaged probabilities of the T new queries over S keys."""

    def select(self, layer: int) -> torch.Tensor:
        """Sorted entry indices to keep, (B, H, budget), among the ``kept[layer]`` > budget stored."""
        raise NotImplementedError

    def advance(self, n: int) -> None:
        super().advance(n)
        for layer in range(len(self.k)):
            if self.kept[layer] > self.budget:
                keep = self.select(layer)  # (B, H, n_keep)
                n_keep = keep.shape[2]
                for store in (self.k, self.v):
                    index = keep[..., None].expand(-1, -1, -1, store[layer].shape[3])  # (B, H, n_keep, d_head)
                    store[layer][:, :, :n_keep] = store[layer].gather(2, index)
                for store in (self.pos, *self.stats()):  # entries on the last dim: (B, H, [w,] capacity)
                    t = store[layer]
                    index = keep.view(*keep.shape[:2], *[1] * (t.ndim - 3), n_keep).expand(*t.shape[:-1], n_keep)
                    gathered = t.gather(-1, index)
                    t.zero_()
                    t[..., :n_keep] = gathered
                self.kept[layer] = n_keep

    def truncate(self, length: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} has evicted tokens and cannot roll back to "
                                  f"length={length}; speculative decoding needs the dense KVCache")

    def reset(self) -> None:
        super().reset()
        self.kept = [0] * len(self.k)
        for store in self.stats():
            for t in store:
                t.zero_()


def attention_weights(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """a (B, H, T, S): softmax(q kᵀ / √d) of queries (B, n_heads, T, d) on the last-T-are-new keys (B, H, S, d),
    causal among the new ones, averaged over the query heads that share each key/value head."""
    B, n_heads, T, d = q.shape
    H, S = keys.shape[1], keys.shape[2]
    k = keys.float().repeat_interleave(n_heads // H, dim=1)  # (B, n_heads, S, d)
    logits = q.float() @ k.transpose(-1, -2) / math.sqrt(d)  # (B, n_heads, T, S)
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs.view(B, H, n_heads // H, T, S).mean(2)  # (B, H, T, S)


def _hand_queries_to_cache(attn: Attention, args: tuple) -> None:
    x, cos, sin, cache = (list(args) + [None])[:4]
    if getattr(cache, "wants_queries", False):  # a scoring cache (or a stack holding one)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.n_heads, attn.d_head).transpose(1, 2)  # (B, n_heads, T, d_head)
        cache.receive_queries(attn.layer, apply_rope(q, cos, sin))


def install_query_hooks(model: Llama) -> None:
    """Give every attention module of ``model`` the (idempotent) hook that feeds queries to scoring caches."""
    for block in model.blocks:
        if not getattr(block.attn, "_effref_query_hook", False):
            block.attn.register_forward_pre_hook(_hand_queries_to_cache)
            block.attn._effref_query_hook = True


def _newest_and_best(score: torch.Tensor, n: int, budget: int, recent: int) -> torch.Tensor:
    """Keep the ``recent`` newest of n entries and the best-scoring others, (B, H, budget) sorted."""
    B, H = score.shape[:2]
    newest = torch.arange(n - recent, n, device=score.device).expand(B, H, recent)
    best = score[..., :n - recent].topk(budget - recent, dim=-1).indices  # (B, H, budget - recent)
    return torch.cat([best, newest], dim=-1).sort(dim=-1).values


class StreamingCache(EvictingCache):
    """StreamingLLM: ``sinks`` first tokens (the attention sinks) + a window of the most recent ones."""

    def __init__(self, *args, budget: int, sinks: int = 4, **kwargs):
        if not 0 <= sinks < budget:
            raise ValueError(f"sinks={sinks} must be in [0, budget={budget}) so that the window is not empty")
        super().__init__(*args, budget=budget, **kwargs)
        self.sinks = sinks

    def select(self, layer: int) -> torch.Tensor:
        n, B, H = self.kept[layer], self.batch_size, self.k[layer].shape[1]
        keep = list(range(self.sinks)) + list(range(n - (self.budget - self.sinks), n))
        return torch.tensor(keep, device=self.pos[layer].device).expand(B, H, self.budget)


class H2OCache(EvictingCache):
    """H2O: ``recent`` newest tokens + heavy hitters by accumulated attention."""

    needs_attention = True

    def __init__(self, *args, budget: int, recent: int | None = None, **kwargs):
        recent = budget // 2 if recent is None else recent  # the paper's default: half recent, half heavy
        if not 0 <= recent <= budget:
            raise ValueError(f"recent={recent} must be in [0, budget={budget}]")
        super().__init__(*args, budget=budget, **kwargs)
        self.recent = recent
        self.score = [torch.zeros_like(p, dtype=torch.float32) for p in self.pos]  # (B, H, capacity) F_j

    def stats(self) -> list[list[torch.Tensor]]:
        return [self.score] if hasattr(self, "score") else []

    def observe(self, layer: int, attn: torch.Tensor) -> None:
        self.score[layer][..., :attn.shape[-1]] += attn.sum(2)  # accumulate over the T new queries

    def select(self, layer: int) -> torch.Tensor:
        return _newest_and_best(self.score[layer], self.kept[layer], self.budget, self.recent)


class ScissorhandsCache(EvictingCache):
    """Scissorhands: drop the tokens that were most often unimportant over the last ``history`` steps."""

    needs_attention = True

    def __init__(self, *args, budget: int, recent: int | None = None, history: int = 32, batch_drop: int = 1,
                 **kwargs):
        recent = budget // 4 if recent is None else recent
        if not 0 <= recent < budget or history < 1 or not 1 <= batch_drop <= budget - recent:
            raise ValueError(f"recent={recent}, history={history}, batch_drop={batch_drop}: need 0 <= recent < "
                             f"budget={budget}, history >= 1 and 1 <= batch_drop <= budget - recent")
        super().__init__(*args, budget=budget, **kwargs)
        self.recent, self.history, self.batch_drop = recent, history, batch_drop
        self.low = [torch.zeros(*p.shape[:2], history, p.shape[2], dtype=torch.bool, device=p.device)
                    for p in self.pos]  # (B, H, w, capacity): "below the uniform share" at each past step

    def stats(self) -> list[list[torch.Tensor]]:
        return [self.low] if hasattr(self, "low") else []

    def observe(self, layer: int, attn: torch.Tensor) -> None:
        B, H, T, S = attn.shape
        visible = torch.ones(T, S, dtype=torch.bool, device=attn.device).tril(diagonal=S - T)  # (T, S)
        share = 1.0 / visible.sum(-1, keepdim=True)  # (T, 1) the uniform attention of each query
        low = (attn < share) & visible  # (B, H, T, S)
        rows = torch.zeros(B, H, T, self.low[layer].shape[-1], dtype=torch.bool, device=attn.device)
        rows[..., :S] = low
        self.low[layer] = torch.cat([self.low[layer], rows], dim=2)[:, :, -self.history:]  # the last w steps

    def select(self, layer: int) -> torch.Tensor:
        n = self.kept[layer]
        count = self.low[layer][..., :n].sum(2).double()  # (B, H, n) steps spent below the uniform share
        order = torch.arange(n, device=count.device, dtype=torch.double) / (n + 1)  # ties: keep the newer
        keep = self.budget - self.batch_drop + 1
        return _newest_and_best(order - count, n, keep, self.recent)
