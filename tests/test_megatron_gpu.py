"""BASE routing in Megatron-core on GPUs: the parts that need CUDA in every supported release (0.16.1 – 0.19.x).

Full GPTModel with the BASE spec (local and, where Transformer Engine is installed, TE specs with
grouped GEMM) with a forward/backward (its attention needs CUDA), the alltoall dispatcher over NCCL,
EP 2 == EP 1 on the same tokens, EP 2 x TP 2 with sequence parallelism, distributed-checkpoint
save/load and resharding between EP 2 and EP 1, and the Megatron-LM example end to end (with
MEGATRON_LM_DIR pointing at a core_v0.19.0 or core_v0.16.1 checkout). The CPU versions of the EP tests
(gloo, both dispatchers) are in test_megatron_ep.py.

Skipped without CUDA (and each multi-GPU test without enough GPUs). Ranks are spawned by
tests/multirank.py, which joins them with gloo; each rank then re-joins over NCCL on 127.0.0.1.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA: NCCL, GPU experts and a whole GPTModel forward (the CPU versions of the EP "
                "tests run in test_megatron_ep.py)", allow_module_level=True)
pytest.importorskip("megatron.core")

from multirank import free_port, run_ranks  # noqa: E402

from base_plugin.assignment import default_capacity  # noqa: E402

E, D, FFN = 4, 64, 128
TIMEOUT = 300
GPUS = torch.cuda.device_count()


def _nccl(rank, world, port, tp=1, ep=1, etp=1):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    dist.destroy_process_group()  # run_ranks' gloo group -> NCCL
    torch.cuda.set_device(rank)
    # a collective that never matches raises after 2 minutes instead of holding the GPU until TIMEOUT
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)
    model_parallel_cuda_manual_seed(1234)
    return ps


def _reinit(tp=1, ep=1, etp=1):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)
    model_parallel_cuda_manual_seed(1234)


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from base_plugin.megatron import base_config_kwargs

    args = dict(num_layers=2, hidden_size=D, num_attention_heads=4, num_moe_experts=E, moe_ffn_hidden_size=FFN,
                ffn_hidden_size=FFN, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
                params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    args.update(base_config_kwargs())
    args.update(kw)
    return TransformerConfig(**args)


def _moe_layer(config, seed, use_te=False, **router_options):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from base_plugin.megatron import with_base_router

    torch.manual_seed(seed)
    spec = with_base_router(get_moe_module_spec(use_te=use_te, num_experts=E), shuffle=False, **router_options)
    return spec(config=config).cuda()  # a ModuleSpec (0.16, 0.17) or a partial (0.18+): both build when called


def _have_te():
    try:
        import transformer_engine  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - installed but broken for this torch counts as absent
        return False


# ------------------------------------------------------------------ full GPTModel, one GPU
def _gpt(rank, world, port, use_te, paper_form, config_route, grouped):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from base_plugin.megatron import build_gpt_model, check_base_routers, get_gpt_layer_with_base_spec

    _nccl(rank, world, port)
    config = _config(moe_grouped_gemm=grouped)
    torch.manual_seed(0)
    if config_route:  # stock spec (TopKRouter named in it) + the "base" config flag
        model = build_gpt_model(config, get_gpt_layer_local_spec(num_experts=E), vocab_size=128,
                                max_sequence_length=32).cuda()
    else:
        spec = get_gpt_layer_with_base_spec(E, use_te=use_te, paper_form=paper_form, moe_grouped_gemm=grouped)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=32).cuda()
    routers = check_base_routers(model)
    assert len(routers) == config.num_layers
    b, s = 3, 32
    tokens = torch.randint(0, 128, (b, s), device="cuda")
    position_ids = torch.arange(s, device="cuda").expand(b, s)
    mask = ~torch.tril(torch.ones(s, s, dtype=torch.bool, device="cuda"))[None, None]  # True = masked out
    model.train()
    loss = model(tokens, position_ids, mask, labels=tokens)
    assert loss.shape == (b, s) and torch.isfinite(loss).all()
    loss.mean().backward()
    for r in routers:
        assert torch.equal(r.last_stats["tokens_per_expert"].cpu(), default_capacity(b * s, E))
        assert abs(float(r.last_stats["gap"])) < 1e-3
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(tokens, position_ids, mask, labels=tokens)).all()
    return True


@pytest.mark.parametrize("use_te,paper_form,config_route,grouped", [
    (False, False, False, False), (False, True, False, False), (False, False, True, False),
    (True, False, False, True), (True, True, False, True)])
def test_gpt_model_with_base_spec(use_te, paper_form, config_route, grouped):
    if use_te and not _have_te():
        pytest.skip("Transformer Engine is not installed (TE spec and grouped GEMM)")
    assert run_ranks(_gpt, 1, free_port(), use_te, paper_form, config_route, grouped, timeout=TIMEOUT) == [True]


# ------------------------------------------------------------------ EP 2 (x TP 2) == EP 1 on the same tokens
def _ep_equal(rank, world, port, tp, dispatcher):
    from megatron.core import parallel_state as ps

    _nccl(rank, world, port)  # EP 1, TP 1: every rank holds all experts
    seq = 16
    cfg1 = _config(moe_token_dispatcher_type=dispatcher)
    ref = _moe_layer(cfg1, seed=7)
    torch.manual_seed(100 + rank)
    x = torch.randn(seq // tp, 2, D, device="cuda")  # this rank's tokens (its sequence-parallel chunk)
    x1 = x.clone().requires_grad_()
    y1 = ref(x1)[0]
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    _reinit(tp=tp, ep=2, etp=1)
    cfg2 = _config(moe_token_dispatcher_type=dispatcher, tensor_model_parallel_size=tp,
                   expert_model_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=tp > 1)
    layer = _moe_layer(cfg2, seed=8)
    ep_rank, local = ps.get_expert_model_parallel_rank(), E // 2
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if ".local_experts." in n:
                i = int(n.split(".local_experts.")[1].split(".")[0])
                g = n.replace(f".local_experts.{i}.", f".local_experts.{ep_rank * local + i}.")
                p.copy_(full[g])
            else:
                p.copy_(full[n])
    x2 = x.clone().requires_grad_()
    y2 = layer(x2)[0]
    (y2 * w).sum().backward()
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for n, p in layer.named_parameters():
        if ".local_experts." in n:  # expert grads: EP 2 sums the tokens of both ranks' data
            continue
        # the router weight's grad is local to this rank's tokens in both layouts (no DP reduce here)
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)
    return True


@pytest.mark.parametrize("tp,dispatcher", [(1, "alltoall"), (1, "allgather"), (2, "alltoall")])
def test_ep2_equals_ep1(tp, dispatcher):
    world = 2 * tp
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, found {GPUS}")
    assert run_ranks(_ep_equal, world, free_port(), tp, dispatcher, timeout=TIMEOUT) == [True] * world


# ------------------------------------------------------------------ distributed checkpoint across EP sizes
def _dist_ckpt(rank, world, port, path, save_ep, load_ep):
    from megatron.core import dist_checkpointing

    _nccl(rank, world, port)
    _reinit(ep=save_ep)
    a = _moe_layer(_config(expert_model_parallel_size=save_ep), seed=21)
    torch.manual_seed(300 + rank)
    x = torch.randn(12, 2, D, device="cuda")
    with torch.no_grad():
        ya = a(x)[0]
    dist_checkpointing.save(a.sharded_state_dict(prefix="mlp."), path)

    _reinit(ep=load_ep)
    b = _moe_layer(_config(expert_model_parallel_size=load_ep), seed=22)
    with torch.no_grad():
        assert not torch.allclose(b(x)[0], ya)
    loaded = dist_checkpointing.load(b.sharded_state_dict(prefix="mlp."), path)
    missing, unexpected = b.load_state_dict({k[len("mlp."):]: v for k, v in loaded.items()}, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(b(x)[0], ya, rtol=1e-5, atol=1e-6)
    return True


@pytest.mark.parametrize("save_ep,load_ep", [(2, 1), (1, 2), (2, 2)])
def test_dist_ckpt_resharding_across_ep_sizes(tmp_path, save_ep, load_ep):
    if GPUS < 2:
        pytest.skip(f"needs 2 GPUs, found {GPUS}")
    # daemon=False: Megatron's checkpoint writer starts processes of its own
    assert run_ranks(_dist_ckpt, 2, free_port(), str(tmp_path), save_ep, load_ep, timeout=TIMEOUT,
                     daemon=False) == [True, True]


def _dist_ckpt_one(rank, world, port, path):
    return _dist_ckpt(rank, world, port, path, 1, 1)


def test_dist_ckpt_round_trip_one_gpu(tmp_path):
    assert run_ranks(_dist_ckpt_one, 1, free_port(), str(tmp_path), timeout=TIMEOUT, daemon=False) == [True]


# ------------------------------------------------------------------ the Megatron-LM recipe
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"), reason="set MEGATRON_LM_DIR to a Megatron-LM "
                    "core_v0.19.0 (or core_v0.16.1) checkout to run the recipe")
def test_pretrain_gpt_base_example_runs(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ["MEGATRON_LM_DIR"], root]),
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), os.path.join(root, "examples", "megatron", "pretrain_gpt_base.py"),
           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
           "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--num-experts", "4", "--moe-token-dispatcher-type", "alltoall",
           "--moe-router-load-balancing-type", "base", "--lr", "1e-4", "--train-iters", "3",
           "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--eval-iters", "0",
           "--save", str(tmp_path / "ckpt"), "--save-interval", "3", "--ckpt-format", "torch_dist"]
    if not _have_te():
        cmd += ["--transformer-impl", "local"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert re.search(r"iteration\s+3/", run.stdout), run.stdout[-4000:]
