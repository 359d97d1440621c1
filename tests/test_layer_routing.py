"""The routing pieces under BaseLayer and the Megatron router: route, route_shuffled, Permutation."""
import pytest
import torch
import torch.distributed as dist

from base_plugin.assignment import balanced_assignment, default_capacity
from base_plugin.layer.permute import Permutation
from base_plugin.layer import exchange_counts
from base_plugin.layer.routing import check_router, even_shares, exact_dispatch_counts, route, route_shuffled
from multirank import run_ranks

E = 4
SIZES = (0, 7, 13, 30)  # rows per rank: an empty rank, uneven counts, N % E != 0


def _scores(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(SIZES[rank], E, generator=g, dtype=torch.float64)


def _shuffle_job(rank, world):
    scores = _scores(rank)
    torch.manual_seed(7 + rank)
    counted = route_shuffled(scores, "exact", dist.group.WORLD)
    torch.manual_seed(7 + rank)  # the same permutation, the counts given instead of exchanged
    given = route_shuffled(scores, "exact", dist.group.WORLD, sizes=list(SIZES[:world]))
    torch.manual_seed(7 + rank)  # and the per-expert tallies riding on the experts-back messages
    tallied = route_shuffled(scores, "exact", dist.group.WORLD, sizes=list(SIZES[:world]), incoming=True)
    exchanged = exchange_counts(torch.bincount(tallied.experts, minlength=E), dist.group.WORLD)
    try:
        route_shuffled(scores, "exact", dist.group.WORLD, sizes=[1] * world)
        error = None
    except ValueError as e:
        error = str(e)
    return dict(counted=counted.experts, solved=counted.solved, objective=counted.objective,
                given=given.experts, given_solved=given.solved, error=error, tallied=tallied.experts,
                incoming=tallied.incoming, exchanged=exchanged, plain_incoming=given.incoming)


@pytest.mark.parametrize("world", [2, 4])
def test_route_shuffled_routes_every_row_once_and_balances_every_rank(world):
    out = run_ranks(_shuffle_job, world, timeout=120)
    total = sum(SIZES[:world])
    for k in range(world):
        assert torch.equal(out[k]["counted"], out[k]["given"])
        assert torch.equal(out[k]["counted"], out[k]["tallied"])
        # what every rank will send to rank k's experts, without a count exchange
        assert out[k]["plain_incoming"] is None
        assert torch.equal(out[k]["incoming"], out[k]["exchanged"])
        assert torch.equal(out[k]["solved"], out[k]["given_solved"])
        assert out[k]["counted"].shape == (SIZES[k],)
        solved = out[k]["solved"]  # each rank balanced exactly the rows it was dealt
        assert torch.bincount(solved, minlength=E).tolist() == default_capacity(solved.numel(), E).tolist()
        assert "does not fit a group" in out[k]["error"]
    assert sum(out[k]["solved"].numel() for k in range(world)) == total
    # Rebuild the deal from the seeds: rank k received, from every rank j in order, its share of j's
    # permuted rows; it must have solved exactly those rows, and each row's owner got that answer back.
    perms = []
    for j in range(world):
        torch.manual_seed(7 + j)
        perms.append(torch.randperm(SIZES[j]))
    shares = [default_capacity(SIZES[j], world).tolist() for j in range(world)]
    expected = [torch.empty(SIZES[j], dtype=torch.long) for j in range(world)]
    for k in range(world):
        rows = [(j, perms[j][sum(shares[j][:k]):sum(shares[j][:k + 1])]) for j in range(world)]
        received = torch.cat([_scores(j)[idx] for j, idx in rows])
        solved = balanced_assignment(received).long()
        assert torch.equal(out[k]["solved"], solved)
        torch.testing.assert_close(out[k]["objective"], received.gather(1, solved[:, None]).sum())
        start = 0
        for j, idx in rows:
            expected[j][idx] = solved[start:start + idx.numel()]
            start += idx.numel()
    for j in range(world):
        assert torch.equal(out[j]["counted"], expected[j])


def test_route_without_group_is_the_exact_assignment():
    scores = _scores(3)
    r = route_shuffled(scores, "exact", None)
    assert torch.equal(r.experts, balanced_assignment(scores).long())
    assert torch.equal(r.experts, r.solved)
    assert float(r.gap) < 1e-9
    assert torch.equal(route(scores, "greedy").experts, scores.argmax(1))
    assert float(route(scores, "greedy").gap) == 0.0
    custom = route(scores, lambda s: torch.zeros(s.shape[0], dtype=torch.int32))
    assert custom.experts.dtype == torch.long and torch.isnan(custom.gap)
    assert float(custom.objective) == pytest.approx(float(scores[:, 0].sum()))


@pytest.mark.parametrize("experts,world", [(4, 1), (4, 2), (12, 4), (8, 8)])
def test_exact_dispatch_counts_match_the_balanced_assignment(experts, world):
    """Without a shuffle, exact routing's dispatch follows from the row counts: check it against the
    capacities every rank's assignment actually fills (rows of all ranks, expert e on rank e // L)."""
    g = torch.Generator().manual_seed(experts * world)
    sizes = [0, 1, experts - 1, experts, 3 * experts + 5, 41, 2, 17][:world]
    local = experts // world
    per_rank = [torch.bincount(balanced_assignment(torch.randn(m, experts, generator=g)).long(),
                               minlength=experts) for m in sizes]
    for m, counts in zip(sizes, per_rank):
        assert counts.tolist() == even_shares(m, experts) == default_capacity(m, experts).tolist()
    for rank in range(world):
        send, recv, incoming = exact_dispatch_counts(sizes, experts, rank)
        assert send == per_rank[rank].view(world, local).sum(1).tolist()
        assert recv == [int(c[rank * local:(rank + 1) * local].sum()) for c in per_rank]
        assert incoming == torch.stack([c[rank * local:(rank + 1) * local] for c in per_rank]).flatten().tolist()


def test_check_router_names_owner_and_option():
    check_router("assignment", "exact", "X")
    check_router("inference", lambda s: s.argmax(1), "X")
    with pytest.raises(ValueError, match=r"Owner: inference must be one of \('exact', 'greedy'\)"):
        check_router("inference", "top2", "Owner")


def test_permutation_apply_undo_and_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randint(0, 3, (9,), generator=g)
    p = Permutation.sorting(keys)
    assert torch.equal(p.index, torch.argsort(keys, stable=True))
    y = p.apply(x)
    assert torch.equal(y, x[p.index])
    assert torch.equal(p.undo(y), x)
    up = torch.randn(9, 5, dtype=torch.float64, generator=g)
    (p.apply(x) * up).sum().backward()
    expected = torch.autograd.grad((x[p.index] * up).sum(), x)[0]
    assert torch.equal(x.grad, expected)
    torch.autograd.gradcheck(lambda t: p.undo(p.apply(t) * 2), (x.detach().clone().requires_grad_(),))
    empty = Permutation.sorting(torch.empty(0, dtype=torch.long))
    assert empty.apply(torch.zeros(0, 5)).shape == (0, 5)


# ---------------------------------------------------------------- what BaseLayer puts on the wire
D_SPY, E_SPY = 8, 4


def _rows(rank):
    return 10 + 3 * rank


def _collectives_job(rank, world):
    from base_plugin.layer import BaseExpert, BaseLayer
    from collective_spy import CollectiveSpy

    torch.manual_seed(0)
    layer = BaseLayer(D_SPY, [BaseExpert(D_SPY, 16) for _ in range(E_SPY // world)], E_SPY)
    x = torch.randn(_rows(rank), D_SPY, requires_grad=True)
    layer(x)  # the first call adds the one-time size check
    out = {}
    for mode in ("shuffle", "train", "eval"):
        layer.train(mode != "eval")
        layer.shuffle = mode == "shuffle"
        with CollectiveSpy() as fwd:
            y = layer(x)
        with CollectiveSpy() as bwd:
            y.sum().backward()
        out[mode] = ([c[:2] for c in fwd.calls], [c[:2] for c in bwd.calls])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_base_layer_collectives_per_call(world):
    """The collectives BaseLayer's docstring promises, and their payloads: the shuffle moves score rows
    (E floats per token) and chosen experts, never hidden states; only the dispatch moves [n, d] rows."""
    out = run_ranks(_collectives_job, world, timeout=120)
    a2a = "all_to_all_single"
    for k in range(world):
        n = _rows(k)
        dealt = sum(default_capacity(_rows(j), world)[k].item() for j in range(world))
        fwd, bwd = out[k]["shuffle"]
        assert [op for op, _ in fwd] == ["all_gather"] + [a2a] * 4
        # received score rows (float32 [dealt, E]), experts back (int64 [n]) after a tally of E counts
        # from each rank (so no count exchange), then the tokens (float32 [*, d]) to the experts and back
        assert [b for _, b in fwd[1:3]] == [dealt * E_SPY * 4, (n + world * E_SPY) * 8]
        assert fwd[4][1] == n * D_SPY * 4
        assert [op for op, _ in bwd] == [a2a, a2a]
        # exact without the shuffle: the dispatch follows from the token counts of the all_gather;
        # greedy (eval) exchanges counts (int64 [E]) first
        for mode, expected in (("train", ["all_gather", a2a, a2a]), ("eval", ["all_gather", a2a, a2a, a2a])):
            fwd, bwd = out[k][mode]
            assert [op for op, _ in fwd] == expected
            assert [op for op, _ in bwd] == [a2a, a2a]
        assert out[k]["eval"][0][1][1] == E_SPY * 8
