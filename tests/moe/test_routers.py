"""Routers against slow, obviously-correct versions of their papers' rules, transformers' balancing loss,
brute force and scipy for BASE's assignment, and a table of bad arguments."""

import itertools

import numpy as np
import pytest
import torch

from effref.moe import (
    BaseRouter,
    ExpertChoiceRouter,
    Experts,
    GShardRouter,
    MoELayer,
    StableMoERouter,
    SwitchRouter,
    TopKRouter,
    balanced_assignment,
    capacity,
    linear_assignment,
    load_balancing_loss,
)


def tokens(T=64, D=16, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def skewed(router, seed=0, scale=3.0):
    """A router with large random weights: confident, unbalanced choices, as early in training."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        router.gate.weight.copy_(scale * torch.randn(router.gate.weight.shape, generator=g))
    return router


def assignments(routing):
    return sorted(zip(routing.token.tolist(), routing.expert.tolist(), [round(w, 6) for w in routing.weight.tolist()]))


# --- Switch -----------------------------------------------------------------------------------------------------

def test_switch_loss_equals_transformers_top1_and_is_one_when_uniform():
    modeling_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = 2 * tokens(128, 8, seed=1)
    probs = logits.softmax(-1)
    theirs = modeling_mixtral.load_balancing_loss_func((logits,), 8, top_k=1)
    torch.testing.assert_close(load_balancing_loss(probs, probs.argmax(-1, keepdim=True)), theirs)
    uniform = torch.full((16, 4), 0.25)
    balanced = torch.arange(16).remainder(4)[:, None]
    torch.testing.assert_close(load_balancing_loss(uniform, balanced), torch.tensor(1.0))
    collapsed = torch.zeros(16, 1, dtype=torch.long)  # every token to expert 0, all probability on it
    assert load_balancing_loss(torch.eye(4)[[0] * 16], collapsed) == 4.0  # the maximum, N


def test_switch_capacity_keeps_the_first_tokens_of_each_expert():
    router = skewed(SwitchRouter(16, 4, capacity_factor=1.0, aux_coef=0.01))
    x = tokens()
    routing = router(x)
    probs = torch.softmax(x @ router.gate.weight.detach().T, -1)
    C, count, expected = capacity(64, 4, 1.0), [0] * 4, []
    for t in range(64):  # Switch Eq. 3, one token at a time in batch order
        e = int(probs[t].argmax())
        if count[e] < C:
            expected.append((t, e, round(float(probs[t, e]), 6)))
        count[e] += 1
    assert assignments(routing) == sorted(expected)
    assert routing.dropped_fraction() > 0 and routing.load().max() == C == 16
    torch.testing.assert_close(routing.aux_loss, 0.01 * load_balancing_loss(probs, probs.argmax(-1, keepdim=True)))


def test_dropped_tokens_pass_through_the_residual_unchanged():
    router = skewed(SwitchRouter(16, 4, capacity_factor=0.5))
    layer = MoELayer(router, Experts(4, 16, 8))
    x = tokens().view(4, 16, 16)
    y = layer(x).view(64, 16)
    dropped = layer.routing.experts_per_token() == 0
    assert dropped.sum() >= 32  # capacity 8 per expert: at most 32 of 64 tokens get one
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))  # the block adds 0: x + y = x
    assert (y[~dropped].abs().sum(-1) > 0).all()


# --- GShard -----------------------------------------------------------------------------------------------------

def gshard_reference(probs, C, rnd=None):
    """Algorithm 1 of GShard, token by token (rnd None: every second choice wanted)."""
    S, E = probs.shape
    count, kept = [0] * E, []
    top = [sorted(range(E), key=lambda e: -float(probs[s, e]))[:2] for s in range(S)]
    for s, (e1, e2) in enumerate(top):
        g1 = float(probs[s, e1] / (probs[s, e1] + probs[s, e2]))
        if count[e1] < C:
            kept.append((s, e1, round(g1, 6)))
        count[e1] += 1
    for s, (e1, e2) in enumerate(top):
        g2 = float(probs[s, e2] / (probs[s, e1] + probs[s, e2]))
        if rnd is not None and not 2 * g2 > rnd[s]:
            continue
        if count[e2] < C:
            kept.append((s, e2, round(g2, 6)))
        count[e2] += 1
    return sorted(kept)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_gshard_follows_algorithm_1(capacity_factor):
    router = skewed(GShardRouter(16, 4, capacity_factor=capacity_factor,
                                 generator=torch.Generator().manual_seed(5))).train()
    x = tokens()
    routing = router(x)
    probs = torch.softmax(x @ router.gate.weight.detach().T, -1)
    rnd = torch.rand(64, generator=torch.Generator().manual_seed(5))
    C = capacity(64, 4, capacity_factor, top_k=2)
    assert assignments(routing) == gshard_reference(probs, C, rnd)
    assert assignments(router.eval()(x)) == gshard_reference(probs, C)  # evaluation: deterministic
    assert routing.load().max() <= C


def test_gshard_second_expert_is_kept_with_probability_two_g2():
    # 20,000 tokens, unlimited room: the share of second choices dispatched estimates E[min(1, 2·g2)] with a
    # standard error below 0.004; a tolerance of 0.02 is five standard errors.
    router = GShardRouter(16, 4, capacity_factor=4.0, generator=torch.Generator().manual_seed(0)).train()
    skewed(router, scale=0.5)
    x = tokens(20_000, 16, seed=3)
    routing = router(x)
    top = torch.softmax(x @ router.gate.weight.detach().T, -1).topk(2, -1).values
    g2 = top[:, 1] / top.sum(-1)
    expected = torch.clamp(2 * g2, max=1).mean().item()
    second_kept = (routing.experts_per_token() == 2).float().mean().item()
    assert abs(second_kept - expected) < 0.02 and 0.2 < expected < 0.95


def test_gshard_drops_more_as_capacity_shrinks():
    x = tokens(512, 16)
    dropped = [skewed(GShardRouter(16, 8, capacity_factor=c)).eval()(x).dropped_fraction() for c in (0.25, 0.5, 1, 2)]
    assert dropped == sorted(dropped, reverse=True) and dropped[0] > 0.3 and dropped[-1] < dropped[0]


# --- Expert Choice ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_expert_choice_gives_every_expert_exactly_k_tokens(capacity_factor):
    router = skewed(ExpertChoiceRouter(16, 8, capacity_factor=capacity_factor), scale=0.3)  # no ties
    x = tokens()
    routing = router(x)
    k = int(np.ceil(capacity_factor * 64 / 8))
    assert routing.load().tolist() == [k] * 8
    probs = torch.softmax(x @ router.gate.weight.detach().T, -1)
    expected = sorted((t, e, round(float(probs[t, e]), 6)) for e in range(8)
                      for t in sorted(range(64), key=lambda t: -float(probs[t, e]))[:k])
    assert assignments(routing) == expected
    per_token = routing.experts_per_token()
    assert per_token.sum() == 8 * k and per_token.max() > capacity_factor  # some tokens get several experts


def test_expert_choice_bucket_never_exceeds_the_batch():
    assert ExpertChoiceRouter(16, 2, capacity_factor=8.0).bucket_size(10) == 10


# --- BASE layers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_linear_assignment_equals_brute_force(n):
    cost = np.random.default_rng(n).normal(size=(n, n))
    best = min(itertools.permutations(range(n)), key=lambda p: sum(cost[i, p[i]] for i in range(n)))
    assert linear_assignment(cost).tolist() == list(best)


def test_balanced_assignment_equals_brute_force_over_balanced_assignments():
    scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    candidates = {p for p in itertools.permutations([0, 0, 1, 1, 2, 2])}  # all 90 balanced assignments
    best = max(candidates, key=lambda a: sum(float(scores[t, e]) for t, e in enumerate(a)))
    assert balanced_assignment(scores).tolist() == list(best)


@pytest.mark.parametrize("T, E", [(96, 4), (120, 8), (64, 64)])
def test_balanced_assignment_is_optimal_like_scipy(T, E):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T))
    ours = balanced_assignment(scores)
    rows, cols = scipy_optimize.linear_sum_assignment(-scores.numpy().repeat(T // E, axis=1))
    assert torch.equal(ours, torch.from_numpy(cols // (T // E))[torch.from_numpy(np.argsort(rows))])
    assert torch.bincount(ours, minlength=E).tolist() == [T // E] * E
    greedy = scores.max(-1).values.sum()
    assert scores[torch.arange(T), ours].sum() <= greedy  # the balance constraint costs affinity


def test_base_router_balances_in_training_and_is_greedy_at_evaluation():
    router = skewed(BaseRouter(16, 4))
    x = tokens()
    train = router.train()(x)
    assert train.load().tolist() == [16] * 4 and train.dropped_fraction() == 0
    scores = x @ router.gate.weight.detach().T
    torch.testing.assert_close(train.weight, torch.sigmoid(scores[train.token, train.expert]))
    assert torch.equal(router.eval()(x).expert, scores.argmax(-1))


# --- StableMoE --------------------------------------------------------------------------------------------------

def test_stablemoe_distillation_teaches_the_token_router_the_backbone_assignment():
    torch.manual_seed(0)
    vocab, E = 40, 4
    features = torch.randn(vocab, 16)  # a backbone whose representation is a function of the token id
    router = StableMoERouter(16, E, vocab, balance_coef=0.0, distill_coef=1.0).train()
    with torch.no_grad():
        router.centroids.mul_(30)  # a backbone routing that uses every expert
    router.centroids.requires_grad_(False)
    ids = torch.randint(0, vocab, (256,), generator=torch.Generator().manual_seed(1))
    teacher = (features[ids] @ router.centroids.T).argmax(-1)
    def agree():
        return (router.distilled_scores(ids).argmax(-1) == teacher).float().mean().item()

    before = agree()
    opt = torch.optim.Adam([p for p in router.parameters() if p.requires_grad], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        router(features[ids], ids).aux_loss.backward()
        opt.step()
    assert before < 0.6 and agree() > 0.95


def test_stablemoe_stage2_routes_by_token_id_and_stops_learning_it():
    router = StableMoERouter(16, 4, vocab_size=10).train()
    ids = torch.tensor([3, 3, 3, 7, 7, 7])
    x = tokens(6, 16, seed=4) * 10  # the same ids in different contexts
    router.freeze_routing()
    routing = router(x, ids)
    assert routing.expert[0] == routing.expert[1] == routing.expert[2]
    assert routing.expert[3] == routing.expert[4] == routing.expert[5] and routing.aux_loss == 0
    frozen = router.distilled_embed.weight.clone()
    centroids = router.centroids.detach().clone()
    layer = MoELayer(router, Experts(4, 16, 8))
    layer.token_ids = ids
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1.0)
    layer(x[None]).square().sum().backward()
    opt.step()
    assert torch.equal(router.distilled_embed.weight, frozen)  # the routing is frozen
    assert not torch.equal(router.centroids, centroids)  # the gate σ(s) still learns


def test_stablemoe_balance_loss_moves_tokens_off_the_overloaded_expert():
    router = StableMoERouter(16, 4, vocab_size=10, balance_coef=1.0, distill_coef=0.0).train()
    with torch.no_grad():
        router.centroids[0] += 3 * tokens(1000, 16, seed=2).mean(0) / tokens(1000, 16, seed=2).mean(0).norm()
    x, ids = tokens(1000, 16, seed=2), torch.zeros(1000, dtype=torch.long)
    before = router(x, ids).load().max().item()
    opt = torch.optim.SGD([router.centroids], lr=5.0)
    for _ in range(30):
        opt.zero_grad()
        router(x, ids).aux_loss.backward()
        opt.step()
    assert router(x, ids).load().max().item() < before


def test_stablemoe_needs_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        StableMoERouter(16, 4, vocab_size=10)(tokens(4, 16))


# --- bad arguments ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: SwitchRouter(16, 0), "n_experts=0"),
    (lambda: SwitchRouter(16, 4, capacity_factor=0), "capacity_factor=0"),
    (lambda: SwitchRouter(16, 4, capacity_factor=-1.0), "capacity_factor=-1.0"),
    (lambda: SwitchRouter(16, 4, aux_coef=-1), "aux_coef=-1"),
    (lambda: GShardRouter(16, 1), "top_k=2 must be an integer from 1 to n_experts=1"),
    (lambda: GShardRouter(16, 4, capacity_factor=None), "capacity_factor=None"),
    (lambda: ExpertChoiceRouter(16, 4, capacity_factor=0.0), "capacity_factor=0.0"),
    (lambda: ExpertChoiceRouter(16, -2), "n_experts=-2"),
    (lambda: TopKRouter(16, 4, top_k=5), "top_k=5"),
    (lambda: TopKRouter(16, 4, top_k=0), "top_k=0"),
    (lambda: BaseRouter(16, 0), "n_experts=0"),
    (lambda: StableMoERouter(16, 0, vocab_size=5), "n_experts=0"),
    (lambda: Experts(0, 16, 8), "n_experts=0"),
    (lambda: capacity(64, 4, 0), "capacity_factor=0"),
    (lambda: balanced_assignment(torch.randn(10, 4)), "divisible"),
    (lambda: MoELayer(SwitchRouter(16, 4), Experts(8, 16, 8)), "router.n_experts=4"),
])
def test_bad_arguments_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()
