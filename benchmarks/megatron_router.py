"""Megatron-core MoELayer forward+backward time: BASE router vs TopKRouter top-1 and top-2 (aux loss), on CPU.

    python benchmarks/megatron_router.py [--tokens 1024 4096] [--experts 8 32] [--hidden 256] [--ffn 512]
                                         [--repeats 10] [--threads 1]

Same MoELayer (SequentialMLP experts, allgather dispatcher, EP 1, fp32), same hidden states and expert
sizes; only the router differs. ``TopKRouter.gating`` moves its weight to CUDA in megatron-core 0.16,
so the TopKRouter rows use a subclass whose gating is the same linear map kept on the CPU; everything
else in them is Megatron's (softmax top-k, aux loss). Prints a markdown table: median wall time of
forward+backward of the layer, of the router's forward alone (timed round-robin across the three
routers so that machine load affects them alike), and the largest / smallest number of
tokens any expert received (BASE: balanced exactly by construction). Timings, not assertions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from base_plugin.launch import free_port


def _setup(threads: int):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()


def _cpu_topk_router():
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    class CPUTopKRouter(TopKRouter):
        """TopKRouter with its gating linear map computed where the input is (CPU here)."""

        def gating(self, input):
            return torch.nn.functional.linear(input.float(), self.weight.float())

    return CPUTopKRouter


def _layer(kind: str, experts: int, hidden: int, ffn: int):
    import torch
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from base_plugin.megatron import base_config_kwargs, with_base_router

    common = dict(num_layers=1, hidden_size=hidden, num_attention_heads=4, num_moe_experts=experts,
                  moe_ffn_hidden_size=ffn, ffn_hidden_size=ffn, moe_token_dispatcher_type="allgather",
                  use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32)
    spec = get_moe_module_spec(use_te=False, num_experts=experts)
    if kind == "BASE":
        config = TransformerConfig(**common, **base_config_kwargs())
        spec = with_base_router(spec, shuffle=False)
    else:
        topk = 1 if kind.endswith("top-1") else 2
        config = TransformerConfig(**common, moe_router_topk=topk, moe_router_load_balancing_type="aux_loss",
                                   moe_aux_loss_coeff=1e-2, moe_router_pre_softmax=topk == 1)
        spec.submodules.router = _cpu_topk_router()
    torch.manual_seed(0)
    return build_module(spec, config=config)


def _interleaved_medians_ms(fns, repeats: int):
    """Median wall time of each function, timed round-robin (one call of each per round), so that a
    change of machine load during the run affects all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def run(tokens_list, experts_list, hidden, ffn, repeats):
    import torch

    kinds = ("BASE", "TopKRouter top-1", "TopKRouter top-2 + aux loss")
    rows = []
    for experts in experts_list:
        for tokens in tokens_list:
            torch.manual_seed(1)
            x = torch.randn(tokens // 4, 4, hidden)
            steps, routes, loads = [], [], []
            for kind in kinds:
                layer = _layer(kind, experts, hidden, ffn).train()
                h = x.clone().requires_grad_()

                def step(layer=layer, h=h):
                    out, _ = layer(h)
                    out.sum().backward()

                def route(layer=layer, h=h):
                    with torch.no_grad():
                        layer.router(h)

                steps.append(step)
                routes.append(route)
                with torch.no_grad():
                    loads.append(layer.router(h)[1].sum(0))
            totals = _interleaved_medians_ms(steps, repeats)
            routers = _interleaved_medians_ms(routes, repeats)
            for kind, total, router, load in zip(kinds, totals, routers, loads):
                rows.append((tokens, experts, kind, total, router, int(load.max()), int(load.min())))
                print(f"  {tokens} tokens, {experts} experts, {kind}: {total:.1f} ms", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    _setup(a.threads)
    import megatron.core
    import torch

    rows = run(a.tokens, a.experts, a.hidden, a.ffn, a.repeats)
    print(f"\nMoELayer forward+backward on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"megatron-core {megatron.core.__version__}; hidden {a.hidden}, expert FFN {a.ffn}, fp32, "
          f"SequentialMLP experts, allgather dispatcher, median of {a.repeats}\n")
    print("| tokens | experts | router | fwd+bwd ms | router fwd ms | max / min tokens per expert |")
    print("|---:|---:|---|---:|---:|---:|")
    for tokens, experts, kind, total, router, hi, lo in rows:
        print(f"| {tokens} | {experts} | {kind} | {total:.1f} | {router:.2f} | {hi} / {lo} |")


if __name__ == "__main__":
    main()
