"""SLAMB with megatron-core's DistributedDataParallel on 2 gloo CPU ranks (base_plugin.optim.integrations).

megatron-core allocates the DDP gradient buffer on ``torch.cuda.current_device()``
(megatron/core/distributed/param_and_grad_buffer.py, ``_ParamAndGradBuffer.__init__``), and from 0.19
its bucket all-reduce asks ``torch.cuda.current_stream()``; both fail on a CPU-only torch. The test
answers those calls (``megatron_cpu.cuda_calls_on_cpu``, "cpu" / a stream that orders nothing) while
it runs; everything else -- backward hooks into ``main_grad``,
Megatron's own ``finalize_model_grads``, the bucket groups' all-reduce -- is Megatron's code, run on CPU.

* with :func:`disable_megatron_grad_sync`, Megatron's ``finalize_model_grads`` moves no bytes; SLAMB
  (k = 1, H = 1) on ``main_grad`` equals the global-batch LAMB reference; with k = 0.1 the bytes per step
  are exactly SLAMB's own count. Both for ``overlap_grad_reduce`` False and True.
* control: the same DDP without the helper all-reduces every gradient in ``finalize_model_grads``.
* the distributed optimizer is refused.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from base_plugin.optim import SLAMB
from multirank import run_ranks
from collective_spy import CollectiveSpy
from megatron_cpu import cuda_calls_on_cpu
from test_optim_slamb import LR, WD, _model, _reference_lamb, _shard

import megatron.core  # noqa: E402,F401 - installed by the test extra

STEPS, H = 6, 3


def _ddp(overlap, distributed_optimizer=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=overlap,
                                               use_distributed_optimizer=distributed_optimizer)
    with cuda_calls_on_cpu():
        return DistributedDataParallel(config, ddp_config, _model(seed=0))


def _train(rank, k, overlap, disable):
    from megatron.core.distributed import finalize_model_grads

    from base_plugin.optim.integrations import (disable_megatron_grad_sync, megatron_grads_to_params_,
                                                megatron_slamb_groups)
    ddp = _ddp(overlap)
    if disable:
        disable_megatron_grad_sync(ddp)
    opt = SLAMB(ddp.parameters(), lr=LR, weight_decay=WD, compression=k, sync_interval=1 if k == 1 else H,
                dense_threshold=0 if k == 1 else 200, **megatron_slamb_groups(ddp))
    per_step, finalize_bytes, slamb_bytes = [], [], []
    with CollectiveSpy() as spy:
        for t in range(1, STEPS + 1):
            before = spy.bytes()
            ddp.zero_grad_buffer()
            opt.zero_grad(set_to_none=True)
            x, y = _shard(t, rank)
            F.mse_loss(ddp(x), y).backward()
            finalize_model_grads([ddp])  # what Megatron's schedules call after the backward passes
            finalize_bytes.append(spy.bytes() - before)
            if disable:
                megatron_grads_to_params_(ddp)
            else:  # control: Megatron averaged main_grad; hand it over the same way
                for p in ddp.module.parameters():
                    p.grad = p.main_grad
            opt.step()
            per_step.append(spy.bytes() - before)
            slamb_bytes.append(opt.comm_stats.last_step_bytes)
    slamb_bytes[0] -= opt.comm_stats.by_kind.get("broadcast", 0)  # made in the constructor, before the loop
    return dict(params=[p.detach().clone() for p in ddp.module.parameters()], per_step=per_step,
                finalize=finalize_bytes, slamb_bytes=slamb_bytes)


def _job(rank, world):
    with cuda_calls_on_cpu():  # megatron-core 0.19's bucket all-reduce asks torch.cuda.current_stream()
        return _job_on_cpu(rank)


def _job_on_cpu(rank):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    try:
        out = {}
        for overlap in (False, True):
            out[("k1", overlap)] = _train(rank, 1.0, overlap, disable=True)
            out[("k01", overlap)] = _train(rank, 0.1, overlap, disable=True)
        out["control"] = _train(rank, 1.0, False, disable=False)
        try:
            from base_plugin.optim.integrations import disable_megatron_grad_sync
            disable_megatron_grad_sync(_ddp(False, distributed_optimizer=True))
            out["distopt_error"] = None
        except ValueError as exc:
            out["distopt_error"] = str(exc)
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def results():
    return run_ranks(_job, 2, timeout=150)


def test_megatron_ddp_does_not_reduce_and_slamb_k1_is_global_lamb(results):
    ref = _reference_lamb(_model(seed=0), STEPS, shards=2)
    numel = sum(p.numel() for p in _model().parameters())
    for r in range(2):
        for overlap in (False, True):
            got = results[r][("k1", overlap)]
            assert got["finalize"] == [0] * STEPS, overlap
            assert got["per_step"] == got["slamb_bytes"]
            assert got["per_step"][1:] == [4 * numel] * (STEPS - 1)
            for a, b in zip(got["params"], ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # control: Megatron's DDP all-reduces every gradient in finalize_model_grads
        ctl = results[r]["control"]
        assert ctl["finalize"] == [4 * numel] * STEPS
        for a, b in zip(ctl["params"], ref):  # averaging an average is harmless at k = 1: only the bytes differ
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_megatron_ddp_k01_carries_only_slamb_bytes(results):
    numel = sum(p.numel() for p in _model().parameters())
    for r in range(2):
        for overlap in (False, True):
            got = results[r][("k01", overlap)]
            assert got["finalize"] == [0] * STEPS
            assert got["per_step"] == got["slamb_bytes"]
            steady = [b for t, b in enumerate(got["per_step"][1:], start=2) if t % H]
            assert max(steady) < 0.5 * 4 * numel
    for overlap in (False, True):  # STEPS is a multiple of H: replicas agree at the end
        for a, b in zip(results[0][("k01", overlap)]["params"], results[1][("k01", overlap)]["params"]):
            assert torch.equal(a, b)


def test_distributed_optimizer_is_refused(results):
    assert results[0]["distopt_error"].startswith("use_distributed_optimizer must be False")
