"""Expert parallelism > 1 with the BASE router in Megatron-core's MoELayer, on CPU ranks over gloo.

EP 2 on 2 ranks and EP 2 x DP 2 on 4 ranks, with the allgather and the alltoall token dispatchers:
forward and backward equal EP 1 on the same global tokens (every rank keeps its own tokens; the
routing is each rank's exact balanced assignment, the same in both layouts), each rank's tokens are
balanced exactly and every expert receives exactly the tokens the ranks of its expert-parallel group
assigned to it; a ``dist_checkpointing`` save at EP 2 loads at EP 1 and back with identical outputs.
Megatron's unconditional ``torch.cuda`` calls are answered for a CPU-only torch by
``megatron_cpu.cuda_calls_on_cpu`` (test-only); megatron-core itself runs unmodified. The GPU versions
(NCCL, TP x EP with sequence parallelism) are in test_megatron_gpu.py.
"""
from __future__ import annotations

import os

import pytest
import torch

import megatron.core  # noqa: F401 - the README test command installs megatron-core

from multirank import run_ranks
from test_megatron_router import D, E, build, init_megatron, make_config, moe_spec

from base_plugin.assignment import default_capacity

TIMEOUT = 240
# sequence length per rank (batch 2): Megatron's allgather dispatcher gathers equal-sized chunks; the
# alltoall dispatcher exchanges counts first, so its ranks hold uneven numbers of tokens here
TOKENS = {"allgather": (11, 11, 11, 11), "alltoall": (12, 7, 9, 10)}
DISPATCHERS = tuple(TOKENS)


def _inputs(rank, dispatcher):
    torch.manual_seed(100 + rank)
    n = TOKENS[dispatcher][rank]
    return torch.randn(n, 2, D), torch.randn(n, 2, D)


def _config(dispatcher, ep):
    # weights of unit scale, so that outputs and gradients are O(1) and an absolute tolerance means something
    return make_config(moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=ep, init_method_std=1.0)


def _global_expert(name: str, ep_rank: int, local: int) -> str:
    i = int(name.split(".local_experts.")[1].split(".")[0])
    return name.replace(f".local_experts.{i}.", f".local_experts.{ep_rank * local + i}.")


def _received_counts(layer):
    """Record the token counts the layer's local experts receive per call (Megatron passes them)."""
    seen = []

    def hook(module, args):
        seen.append(torch.as_tensor(args[1]).long().clone())

    layer.experts.register_forward_pre_hook(hook)
    return seen


def _ep_case(rank, dispatcher, root):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    x, w = _inputs(rank, dispatcher)
    # EP 1: every rank holds every expert and routes its own tokens
    init_megatron(ep=1)
    ref = build(moe_spec(shuffle=False), _config(dispatcher, 1), seed=7)
    x1 = x.clone().requires_grad_()
    y1 = ref(x1)[0]
    (y1 * w).sum().backward()
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ps.destroy_model_parallel()

    # EP 2: the same weights, experts split over the expert-parallel group
    init_megatron(ep=2)
    ep_group, ep_rank, local = ps.get_expert_model_parallel_group(), ps.get_expert_model_parallel_rank(), E // 2
    layer = build(moe_spec(shuffle=False), _config(dispatcher, 2), seed=8)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.copy_(full[_global_expert(n, ep_rank, local) if ".local_experts." in n else n])
    received = _received_counts(layer)
    x2 = x.clone().requires_grad_()
    y2 = layer(x2)[0]
    (y2 * w).sum().backward()
    out = dict(y=(y2 - y1).abs().max().item(), x_grad=(x2.grad - x1.grad).abs().max().item(),
               y_scale=y1.abs().max().item())
    # non-expert grads are this rank's own; an expert's grad sums its EP group's tokens
    summed = {n: g.clone() for n, g in grads.items() if ".local_experts." in n}
    for n in sorted(summed):  # every expert, in the same order on every rank
        dist.all_reduce(summed[n], group=ep_group)
    diffs = {}
    for n, p in layer.named_parameters():
        want = summed[_global_expert(n, ep_rank, local)] if ".local_experts." in n else grads[n]
        diffs[n] = (p.grad - want).abs().max().item()
    out["grads"] = diffs
    n_tokens = TOKENS[dispatcher][rank] * 2
    out["routed"] = layer.router.last_stats["tokens_per_expert"].tolist()
    out["balanced"] = default_capacity(n_tokens, E).tolist()
    group_ranks = dist.get_process_group_ranks(ep_group)
    shares = sum(default_capacity(TOKENS[dispatcher][r] * 2, E) for r in group_ranks)
    out["received"] = received[-1].tolist()
    out["expected_received"] = shares[ep_rank * local:(ep_rank + 1) * local].tolist()

    if world == 2 and root is not None:  # dist_checkpointing: EP 2 -> EP 1 -> EP 2
        out.update(_reshard(rank, layer, x, y1.detach(), dispatcher, os.path.join(root, dispatcher)))
    ps.destroy_model_parallel()
    return out


def _reshard(rank, ep2_layer, x, y_ref, dispatcher, root):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    def load(layer, path):
        state = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."), path)
        missing, unexpected = layer.load_state_dict({k[len("mlp."):]: v for k, v in state.items()})
        assert not missing and not unexpected, (missing, unexpected)

    def output(layer):
        with torch.no_grad():
            return layer(x)[0]

    paths = [os.path.join(root, "ep2"), os.path.join(root, "ep1")]
    if rank == 0:
        for p in paths:
            os.makedirs(p, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(ep2_layer.sharded_state_dict(prefix="mlp."), paths[0])
    ps.destroy_model_parallel()

    init_megatron(ep=1)
    ep1 = build(moe_spec(shuffle=False), _config(dispatcher, 1), seed=99)
    before = (output(ep1) - y_ref).abs().max().item()
    load(ep1, paths[0])
    at_ep1 = (output(ep1) - y_ref).abs().max().item()
    dist_checkpointing.save(ep1.sharded_state_dict(prefix="mlp."), paths[1])
    ps.destroy_model_parallel()

    init_megatron(ep=2)
    back = build(moe_spec(shuffle=False), _config(dispatcher, 2), seed=98)
    load(back, paths[1])
    at_ep2 = (output(back) - y_ref).abs().max().item()
    saved = dict(ep2_layer.named_parameters())
    same = all(torch.equal(p, saved[n]) for n, p in back.named_parameters()) and len(saved) >= 3
    return dict(ckpt_before=before, ckpt_at_ep1=at_ep1, ckpt_back_at_ep2=at_ep2, ckpt_same_weights=same)


def _ep_job(rank, world, root):
    from megatron_cpu import cuda_calls_on_cpu

    with cuda_calls_on_cpu():
        return {d: _ep_case(rank, d, root) for d in DISPATCHERS}


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ep-ckpt"))
    # daemon=False: Megatron's checkpoint writer starts processes of its own
    return run_ranks(_ep_job, 2, root, timeout=TIMEOUT, daemon=False)


@pytest.fixture(scope="module")
def ep2_dp2():
    return run_ranks(_ep_job, 4, None, timeout=TIMEOUT)


def _check_equal_to_ep1(results):
    for rank, per_dispatcher in enumerate(results):
        for d, r in per_dispatcher.items():
            where = f"rank {rank}, {d}"
            assert r["y_scale"] > 1.0, where  # the layer computes something
            assert r["y"] < 1e-5 and r["x_grad"] < 1e-5, (where, r)
            assert len(r["grads"]) >= 3 and max(r["grads"].values()) < 1e-5, (where, r["grads"])


def _check_balance(results):
    for rank, per_dispatcher in enumerate(results):
        for d, r in per_dispatcher.items():
            assert r["routed"] == r["balanced"], (rank, d, r["routed"])
            assert r["received"] == r["expected_received"], (rank, d, r["received"])


def test_ep2_forward_backward_equal_ep1(ep2):
    _check_equal_to_ep1(ep2)


def test_ep2_exact_per_rank_balance(ep2):
    _check_balance(ep2)


def test_ep2_dist_checkpoint_to_ep1_and_back(ep2):
    for rank, per_dispatcher in enumerate(ep2):
        for d, r in per_dispatcher.items():
            assert r["ckpt_before"] > 1e-3, (rank, d)  # a fresh layer differs before loading
            assert r["ckpt_at_ep1"] < 1e-5 and r["ckpt_back_at_ep2"] < 1e-5, (rank, d, r)
            assert r["ckpt_same_weights"], (rank, d)


def test_ep2_dp2_on_four_ranks_equal_ep1_and_balanced(ep2_dp2):
    _check_equal_to_ep1(ep2_dp2)
    _check_balance(ep2_dp2)
