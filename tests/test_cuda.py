"""BaseLayer and BaseMoE on CUDA, DeepSpeed over NCCL: the paths the CPU suite cannot reach.

* one GPU: BaseLayer on CUDA equals BaseLayer on CPU (outputs, every gradient, routing), training and
  eval; a DeepSpeed engine over NCCL with bf16 and ZeRO 2 learns real text with exact balance, and a
  checkpoint round trip gives identical outputs and an identical continued run;
* one GPU, two ranks: the CPU suite's 2-rank BaseLayer job (tests/test_layer_multirank.py: 50 randomized
  rounds of uneven and empty ranks, shuffle, eval, batched experts, and mismatches that must raise) with
  the layers on the GPU, gloo carrying CUDA tensors, and the same checks;
* two GPUs: EP 2 over NCCL equals the single-process reference (the CPU suite's own check).

Skipped without CUDA, each two-GPU test without two GPUs (NCCL takes one GPU per rank). The rank
functions are the CPU suite's (``tests/test_layer_multirank.py``, ``tests/test_deepspeed_multirank.py``):
each rank joins with gloo through tests/multirank.py, and the DeepSpeed ones re-join over NCCL on
127.0.0.1.
"""
from __future__ import annotations

import copy
import datetime

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA: BaseLayer on GPU and DeepSpeed over NCCL (the CPU paths are tested elsewhere)",
                allow_module_level=True)

import test_deepspeed_multirank as ds  # noqa: E402
from multirank import free_port, run_ranks  # noqa: E402

from base_plugin.assignment import default_capacity  # noqa: E402
from base_plugin.layer import BaseExpert, BaseLayer  # noqa: E402

GPUS = torch.cuda.device_count()
TIMEOUT = 300


def _nccl(rank, world, port):
    import torch.distributed as dist

    dist.destroy_process_group()  # run_ranks' gloo group -> NCCL
    torch.cuda.set_device(rank)
    # a collective that never matches raises after 2 minutes instead of holding the GPU until TIMEOUT
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_base_layer_on_cuda_equals_cpu():
    torch.manual_seed(0)
    d, num = 16, 4
    cpu = BaseLayer(d, [BaseExpert(d, 32, num_sublayers=2) for _ in range(num)], num).double()
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the identity experts of a fresh layer
    gpu = copy.deepcopy(cpu).cuda()
    for training in (True, False):
        cpu.train(training), gpu.train(training)
        x = torch.randn(37, d, dtype=torch.float64)  # 37 % 4 != 0: uneven capacities
        xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
        yc, yg = cpu(xc), gpu(xg)
        assert yg.is_cuda
        torch.testing.assert_close(yg.cpu(), yc, rtol=1e-10, atol=1e-12)
        assert torch.equal(gpu.last_stats.tokens_per_expert.cpu(), cpu.last_stats.tokens_per_expert)
        if training:
            assert cpu.last_stats.tokens_per_expert.tolist() == default_capacity(37, num).tolist()
        up = torch.randn(37, d, dtype=torch.float64)
        (yc * up).sum().backward()
        (yg * up.cuda()).sum().backward()
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-9, atol=1e-11)
        for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
            torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-9, atol=1e-11, msg=name)
            pc.grad = pg.grad = None


def test_base_layer_two_ranks_on_one_gpu():
    """Two ranks share one GPU over gloo (NCCL would need two GPUs): every collective of the layer gets
    CUDA tensors, with uneven and empty ranks, the shuffle, eval and both expert forms."""
    import test_layer_multirank as lm

    job = (2, lm._results(2, "cuda"))
    assert all(res["device"].startswith("cuda") for res in job[1])
    lm.test_equals_single_process_training_and_eval(job)
    lm.test_uneven_and_empty_ranks_with_shuffle(job)
    lm.test_balance_in_training_greedy_in_eval(job)
    lm.test_mismatches_raise_on_every_rank(job)


def _gpu_job(rank, world, port, ckpt_dir):
    import deepspeed
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    set_accelerator(CUDA_Accelerator())  # the harness chose the CPU one for the suite; this job is the GPU one

    _nccl(rank, world, port)
    out = {"text": ds._text_run(rank, world, stage=2, bf16=True, ep_size=world),
           "ckpt": ds._checkpoint_run(rank, world, ckpt_dir, stage=1, ep_size=world),
           "device": str(deepspeed.get_accelerator().current_device_name()),
           "backend": torch.distributed.get_backend()}
    if world == 2:
        out["eq"] = ds._equality_run(rank, world, ep_size=2)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_over_nccl(world, tmp_path):
    """bf16 + ZeRO 2 learns real text; checkpoint round trip (ZeRO 1) exact; on 2 GPUs (EP 2) losses and
    reduced gradients equal the single-process reference and every expert gets exactly its share."""
    pytest.importorskip("deepspeed")
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, found {GPUS}")
    results = run_ranks(_gpu_job, world, free_port(), str(tmp_path / "ckpt"), timeout=TIMEOUT, daemon=False)
    for res in results:
        assert res["device"].startswith("cuda") and res["backend"] == "nccl"
        losses, k = res["text"], 4
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.5, losses
        c = res["ckpt"]
        assert not torch.equal(c["fresh_out"], c["saved_out"])
        assert torch.equal(c["loaded_out"], c["saved_out"])
        assert c["resumed"] == c["continued"]
    if world == 2:
        ds._check_equal(results, 2)
        n = ds.MICRO * ds.SEQ
        for res in results:
            for counts in res["eq"]["counts"]:
                assert counts.tolist() == [n // ds.E] * ds.E
