"""Expert tensor parallelism and comms logging: BaseMoE with a tensor-parallel mpu in real DeepSpeed
engines on 4 gloo CPU ranks (TP 2 x data-parallel 2, EP 2).

One spawned job (module fixture). For ``enable_expert_tensor_parallelism`` True and False:

* groups: DeepSpeed's own ``MoE`` is built with the same arguments and ``deepspeed.initialize(mpu=...)``
  run; the expert-parallel, expert-data-parallel and expert-model-parallel groups that
  ``deepspeed.utils.groups`` then holds are recorded, and must be exactly those BaseMoE gets — built
  before ``deepspeed.initialize(mpu=...)`` (the standard flow) and through
  ``base_plugin.deepspeed.initialize(mpu=...)`` (a DeepSpeed MoE model swapped by the config section) —
  and the groups its layer really calls its collectives on;
* training: 2 AdamW steps of a model whose tokens are replicated over the TP ranks equal the single
  process, where each TP rank's share of a batch is one routing problem. With the flag the experts are
  Megatron-style tensor-parallel FFNs (column- then row-parallel, a shard per TP rank, their own
  all-reduces over the TP group), compared with the full FFNs; without it they are plain FFNs;
* comms logging: with DeepSpeed's ``comms_logger`` enabled, its record of all_gather, all_to_all_single
  and all_gather_into_tensor grows by exactly the collectives BaseMoE makes per forward and backward.
"""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from multirank import run_ranks

D, FFN, E, TP, VOCAB, SEQ, MICRO, SEED, STEPS, LR = 8, 12, 4, 2, 64, 6, 2, 5, 2, 1e-2
EP = 2
TIMEOUT = 500


class TensorParallelMPU:
    """A Megatron-style mpu for DeepSpeed: TP groups of consecutive ranks, data-parallel groups strided."""

    def __init__(self, tp):
        rank, world = dist.get_rank(), dist.get_world_size()
        self.tp = tp
        for start in range(0, world, tp):
            ranks = list(range(start, start + tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group, self.tp_ranks = group, ranks
        for lane in range(tp):
            ranks = list(range(lane, world, tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group, self.dp_ranks = group, ranks

    def get_tensor_model_parallel_rank(self):
        return dist.get_rank() % self.tp

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self):
        return self.tp_ranks[0]

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_rank(self):
        return self.dp_ranks.index(dist.get_rank())

    def get_data_parallel_world_size(self):
        return len(self.dp_ranks)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.dp_ranks)


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the TP group (a column-parallel input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Forward sums the partial outputs over the TP group (a row-parallel output); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FullFFN(nn.Module):
    def __init__(self, d=D, f=FFN):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ShardedFFN(nn.Module):
    """TP shard ``rank`` of a FullFFN: fc1's output rows and fc2's input columns; fc2's bias whole."""

    def __init__(self, group, tp, d=D, f=FFN):
        super().__init__()
        self.group = group
        self.fc1, self.fc2 = nn.Linear(d, f // tp), nn.Linear(f // tp, d, bias=False)
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = F.gelu(self.fc1(_CopyToTensorParallel.apply(x, self.group)))
        return _ReduceFromTensorParallel.apply(self.fc2(h), self.group) + self.bias


class LM(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.moe = moe
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        out, l_aux, _ = self.moe(h)
        return self.head(self.norm(h + out)), l_aux


def dense_weights():
    torch.manual_seed(SEED)
    lm = LM(nn.Identity())
    return {n: p.detach().clone() for n, p in lm.named_parameters()}


def expert_weights(g):
    """Full FFN weights of global expert g."""
    gen = torch.Generator().manual_seed(100 + g)
    return {"fc1.weight": 0.5 * torch.randn(FFN, D, generator=gen), "fc1.bias": 0.1 * torch.randn(FFN, generator=gen),
            "fc2.weight": 0.5 * torch.randn(D, FFN, generator=gen), "fc2.bias": 0.1 * torch.randn(D, generator=gen)}


def centroids():
    return torch.randn(E, D, generator=torch.Generator().manual_seed(7))


def batches():
    """LongTensor[STEPS, data-parallel replicas, MICRO, SEQ]."""
    return torch.randint(0, VOCAB, (STEPS, 2, MICRO, SEQ), generator=torch.Generator().manual_seed(11))


def lm_loss(out, x):
    logits, l_aux = out
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)) + l_aux


def ds_config(comms=False):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "train_batch_size": 2 * MICRO,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
           "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    if comms:
        cfg["comms_logger"] = {"enabled": True, "prof_all": True}
    return cfg


# ----------------------------------------------------------------------------------------------------
# what runs on the ranks

def _reset_deepspeed_groups():
    """Forget DeepSpeed's process-group bookkeeping (its own reset), as in a fresh process."""
    from deepspeed.utils import groups
    groups._release_process_group_references()


def _layout(moe, layer_group):
    from deepspeed.utils import groups
    name = moe.expert_group_name
    return {"ep": sorted(groups._get_expert_parallel_group_ranks(name)),
            "edp": sorted(groups._get_expert_data_parallel_group_ranks(name)),
            "expert_tp": groups._get_expert_model_parallel_world_size(),
            "layer": sorted(dist.get_process_group_ranks(layer_group))}


def _initialize(model, cfg, mpu, ours=False):
    import deepspeed

    import base_plugin.deepspeed as bds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, *_ = (bds.initialize if ours else deepspeed.initialize)(
            model=model, model_parameters=model.parameters(), config=cfg, mpu=mpu)
    return engine


def _deepspeed_moe_layout(mpu, flag):
    from deepspeed.moe.layer import MoE
    engine = _initialize(LM(MoE(D, FullFFN(), num_experts=E, ep_size=EP, enable_expert_tensor_parallelism=flag)),
                         ds_config(), mpu)
    moe = engine.module.moe
    return _layout(moe, moe.deepspeed_moe.ep_group)


def _our_initialize_layout(mpu, flag):
    from deepspeed.moe.layer import MoE
    cfg = {**ds_config(), "base_layer": {"shuffle": False}}
    engine = _initialize(LM(MoE(D, FullFFN(), num_experts=E, ep_size=EP, enable_expert_tensor_parallelism=flag)),
                         cfg, mpu, ours=True)
    moe = engine.module.moe
    assert type(moe).__name__ == "BaseMoE" and moe.enable_expert_tensor_parallelism == flag
    return _layout(moe, moe.deepspeed_moe.group)


def _logged_counts():
    from deepspeed import comm
    ops = ("all_gather", "all_to_all_single", "all_gather_into_tensor")
    return {op: sum(v[0] for v in comm.comms_logger.comms_dict.get(op, {}).values()) for op in ops}


def _base_moe_run(mpu, flag):
    """The standard flow: BaseMoE built, then deepspeed.initialize(mpu=...). Train STEPS steps."""
    from base_plugin.deepspeed import BaseMoE
    tp_rank = mpu.get_tensor_model_parallel_rank()
    local = E // EP
    experts = [ShardedFFN(mpu.tp_group, TP) if flag else FullFFN() for _ in range(local)]
    model = LM(BaseMoE(D, num_experts=E, ep_size=EP, experts=experts, enable_expert_tensor_parallelism=flag,
                       shuffle=False))
    engine = _initialize(model, ds_config(comms=True), mpu)
    moe = engine.module.moe
    cut = slice(tp_rank * FFN // TP, (tp_rank + 1) * FFN // TP)
    dense = dense_weights()
    with torch.no_grad():  # ZeRO 0: the optimizer holds these very tensors
        for n, p in engine.module.named_parameters():
            if n in dense:
                p.copy_(dense[n])
        for i, expert in enumerate(moe.local_experts):
            w = expert_weights(moe.ep_rank * local + i)
            if flag:
                expert.fc1.weight.copy_(w["fc1.weight"][cut])
                expert.fc1.bias.copy_(w["fc1.bias"][cut])
                expert.fc2.weight.copy_(w["fc2.weight"][:, cut])
                expert.bias.copy_(w["fc2.bias"])
            else:
                assert expert.load_state_dict(w, strict=False).missing_keys == ["base_centroid"]
        moe.load_centroids(centroids())
    data = batches()
    replica = mpu.get_data_parallel_rank()
    losses, logged = [], []
    for s in range(STEPS):
        x = data[s, replica]
        before = _logged_counts()
        out = engine(x)
        forward = _logged_counts()
        loss = lm_loss(out, x)
        engine.backward(loss)
        backward = _logged_counts()
        engine.step()
        losses.append(loss.item())
        logged.append({op: (forward[op] - before[op], backward[op] - forward[op]) for op in before})
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return _layout(moe, moe.deepspeed_moe.group), dict(
        losses=losses, logged=logged, params=params, ep_rank=moe.ep_rank, tp_rank=tp_rank,
        edp=sorted(dist.get_process_group_ranks(moe.edp_group)),
        marks={p.group_name for p in moe.parameters() if not getattr(p, "allreduce", True)})


def job(rank, world):
    mpu = TensorParallelMPU(TP)
    out = {"layouts": {}, "runs": {}}
    for flag in (True, False):
        out["layouts"][("deepspeed", flag)] = _deepspeed_moe_layout(mpu, flag)
        _reset_deepspeed_groups()
        out["layouts"][("standard", flag)], out["runs"][flag] = _base_moe_run(mpu, flag)
        _reset_deepspeed_groups()
        out["layouts"][("initialize", flag)] = _our_initialize_layout(mpu, flag)
        _reset_deepspeed_groups()
    return out


# ----------------------------------------------------------------------------------------------------
# single-process reference

def reference():
    """The EP 1 model with full experts, each TP rank's share of a replica's tokens routed on its own;
    AdamW over the mean loss of the two replicas. Per-step losses [STEPS][replica] and final params."""
    from base_plugin.deepspeed import BaseMoE
    moe = BaseMoE(D, num_experts=E, experts=[FullFFN() for _ in range(E)], shuffle=False)
    model = LM(moe)
    dense = dense_weights()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in dense:
                p.copy_(dense[n])
        for g, expert in enumerate(moe.local_experts):
            assert expert.load_state_dict(expert_weights(g), strict=False).missing_keys == ["base_centroid"]
        moe.load_centroids(centroids())

    def forward(x):
        h = model.emb(x)
        flat = h.reshape(-1, D)
        out = torch.cat([moe(part)[0] for part in flat.chunk(TP)]).reshape(h.shape)
        return model.head(model.norm(h + out)), h.new_zeros(())

    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    data, losses = batches(), []
    for s in range(STEPS):
        opt.zero_grad()
        per = [lm_loss(forward(data[s, r]), data[s, r]) for r in range(2)]
        (sum(per) / 2).backward()
        opt.step()
        losses.append([v.item() for v in per])
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(job, 4, timeout=TIMEOUT)


@pytest.mark.parametrize("flag", [True, False])
def test_groups_are_deepspeeds(ranks, flag):
    for rank, r in enumerate(ranks):
        ds = r["layouts"][("deepspeed", flag)]
        assert r["layouts"][("standard", flag)] == ds
        assert r["layouts"][("initialize", flag)] == ds
        assert ds["layer"] == ds["ep"]
    # and what DeepSpeed builds for TP 2 x DP 2, EP 2 (ranks 2t, 2t+1 form TP group t):
    ep = [r["layouts"][("deepspeed", flag)]["ep"] for r in ranks]
    edp = [r["layouts"][("deepspeed", flag)]["edp"] for r in ranks]
    if flag:  # an expert's TP shards are in different EP groups; no expert-data parallelism left
        assert ep == [[0, 2], [1, 3], [0, 2], [1, 3]] and edp == [[0], [1], [2], [3]]
        assert all(r["layouts"][("deepspeed", flag)]["expert_tp"] == TP for r in ranks)
    else:  # the plain expert + data layout, whatever the mpu
        assert ep == [[0, 1], [0, 1], [2, 3], [2, 3]] and edp == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert all(r["layouts"][("deepspeed", flag)]["expert_tp"] == 1 for r in ranks)
    for r in ranks:
        assert r["runs"][flag]["edp"] == r["layouts"][("deepspeed", flag)]["edp"]
        assert r["runs"][flag]["marks"] == {f"ep_size_{EP}"}


@pytest.mark.parametrize("flag", [True, False])
def test_tp2_ep2_training_equals_single_process(ranks, flag):
    ref_losses, ref_params = reference()
    local = E // EP
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    for rank, r in enumerate(ranks):
        run = r["runs"][flag]
        replica = rank // TP
        assert run["losses"] == pytest.approx([ref_losses[s][replica] for s in range(STEPS)], rel=1e-5, abs=1e-6)
        cut = slice(run["tp_rank"] * FFN // TP, (run["tp_rank"] + 1) * FFN // TP)
        for n, p in run["params"].items():
            if not n.startswith(prefix):
                torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-6, msg=n)
                continue
            i, _, tail = n[len(prefix):].partition(".")
            g = run["ep_rank"] * local + int(i)
            full = lambda t: ref_params[f"{prefix}{g}.{t}"]  # noqa: E731
            want = {"fc1.weight": lambda: full("fc1.weight")[cut], "fc1.bias": lambda: full("fc1.bias")[cut],
                    "fc2.weight": lambda: full("fc2.weight")[:, cut], "bias": lambda: full("fc2.bias")}
            expected = want[tail]() if flag and tail in want else full(tail)
            torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {n} (expert {g})")


@pytest.mark.parametrize("flag", [True, False])
def test_comms_logger_sees_every_collective(ranks, flag):
    # forward: the centroid all_gather (+ the one-time size check at the first call) and the two token
    # all_to_alls; the TP gather of the outputs; with TP experts also the count all_gather and the
    # gather of the experts' tokens. Backward: the two all_to_alls again, and the gather that is the
    # backward of each drop of tokens.
    for r in ranks:
        logged = r["runs"][flag]["logged"]
        for step, counts in enumerate(logged):
            assert counts["all_to_all_single"] == (2, 2)
            assert counts["all_gather"] == ((2 if flag else 1) + (step == 0), 0)
            assert counts["all_gather_into_tensor"] == ((2, 2) if flag else (1, 1))
