"""Megatron-core routers on the same tokens and experts: BASE vs Megatron's own balancing routers, on CPU.

    python benchmarks/megatron_router.py [--tokens 1024 4096] [--experts 8 32] [--hidden 256]
                                         [--warmup 20] [--repeats 20] [--threads 1]

Rows (all top-1, one router weight shared by every row, so every router scores the same tokens the same
way): ``BaseRouter`` (exact balanced assignment); ``TopKRouter`` with the aux loss (coefficient 1e-2),
without and with capacity factor 1.0 (tokens over capacity dropped); ``sinkhorn``; aux-loss-free
expert bias (sigmoid scores, ``moe_router_enable_expert_bias``); and, on megatron-core 0.19+, quantile
balancing (per-expert dual prices). The stateful routers (expert bias, quantile balancing) first run
``--warmup`` training batches of the same token distribution with Megatron's own per-global-batch
update after each (``finalize_model_grads._update_router_expert_bias`` / ``_update_router_qb_beta``),
as in training; then every router routes one fresh batch. Tokens are N(0, 1) ("gaussian") or drawn
around a few directions ("clustered": plain top-1 is then badly unbalanced, and the balanced
assignment is degenerate — many tokens want the same experts).

Columns: median wall time of one router call (training mode, forward only; all rows timed round-robin
so that machine load affects them alike), max / mean tokens per expert, dropped tokens (routed
nowhere), and the objective ``Σ_t s[t, e(t)]`` (s = the shared logits) over the exact optimum of the
balanced problem (``balanced_assignment``): BASE is 1 by construction; an unbalanced router can exceed
1 because it ignores the balance constraint. Megatron's stray ``torch.cuda`` calls (``TopKRouter.gating``
moves its weight to ``torch.cuda.current_device()``) are answered by the tests' CPU helper.
Prints a markdown table; timings, not assertions.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # megatron_cpu: the torch.cuda answers for a CPU-only torch

from base_plugin.launch import free_port  # noqa: E402


def _setup(threads: int):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()


def _kinds():
    from base_plugin.megatron import compat

    kinds = {
        "BaseRouter (exact)": dict(base=True),
        "TopKRouter + aux loss": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                                      moe_router_pre_softmax=True),
        "TopKRouter + aux loss, capacity 1.0": dict(moe_router_load_balancing_type="aux_loss",
                                                    moe_aux_loss_coeff=1e-2, moe_router_pre_softmax=True,
                                                    moe_expert_capacity_factor=1.0),
        "sinkhorn": dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
        "expert bias (aux-loss-free)": dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                                            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                            moe_router_bias_update_rate=1e-2),
    }
    if compat.VERSION >= (0, 19, 0):
        kinds["quantile balancing"] = dict(moe_router_load_balancing_type="quantile_balancing",
                                           moe_aux_loss_coeff=0.0, moe_router_pre_softmax=True)
    return kinds


def _router(options: dict, experts: int, hidden: int):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from base_plugin.megatron import BaseRouter, base_config_kwargs
    from base_plugin.megatron.compat import TopKRouter, default_pg_collection

    common = dict(num_layers=1, hidden_size=hidden, num_attention_heads=4, num_moe_experts=experts,
                  use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
                  moe_router_dtype="fp32")
    options = dict(options)
    if options.pop("base", False):
        return BaseRouter(TransformerConfig(**common, **base_config_kwargs()), shuffle=False), None
    config = TransformerConfig(**common, moe_router_topk=1, **options)
    return TopKRouter(config, pg_collection=default_pg_collection()), config


def _tokens(centres, n, hidden, seed):
    """[n, 1, hidden] tokens: each around one of ``centres`` (clustered), or N(0, 1) if ``centres`` is None."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if centres is None:
        return torch.randn(n, 1, hidden, generator=g)
    which = torch.randint(0, centres.shape[0], (n,), generator=g)
    return (centres[which] + 0.5 * torch.randn(n, hidden, generator=g))[:, None, :]


def _update(router, config):
    """Megatron's own per-global-batch update of a stateful router (what finalize_model_grads runs)."""
    import importlib

    # the module, not the function of the same name that megatron.core.distributed exports
    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")

    if getattr(router, "expert_bias", None) is not None:
        fmg._update_router_expert_bias([router], config)
    if getattr(router, "qb_beta_accum", None) is not None:
        fmg._update_router_qb_beta([router], config)
        router.qb_beta_accum.zero_()
        router.qb_beta_count.zero_()


def _interleaved_medians_ms(fns, repeats: int):
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def run(tokens_list, experts_list, hidden, warmup, repeats, distributions):
    import torch

    from base_plugin.assignment import solve_balanced_assignment
    from megatron_cpu import cuda_calls_on_cpu

    rows = []
    kinds = _kinds()
    for distribution, experts, tokens in itertools.product(distributions, experts_list, tokens_list):
        torch.manual_seed(0)
        # clustered: a few popular directions, so top-1 is unbalanced and the assignment degenerate
        centres = torch.randn(max(2, experts // 4), hidden) if distribution == "clustered" else None
        weight = torch.randn(experts, hidden) / hidden ** 0.5
        routers = {}
        with cuda_calls_on_cpu():
            for name, options in kinds.items():
                router, config = _router(options, experts, hidden)
                with torch.no_grad():
                    router.weight.copy_(weight)
                router.train()
                for step in range(warmup):
                    router(_tokens(centres, tokens, hidden, seed=1000 + step))
                    if config is not None:
                        _update(router, config)
                routers[name] = router
            x = _tokens(centres, tokens, hidden, seed=1)
            scores = (x.reshape(-1, hidden) @ weight.t()).double()
            optimum = float(solve_balanced_assignment(scores).objective)
            calls = [lambda r=r: r(x) for r in routers.values()]
            times = _interleaved_medians_ms(calls, repeats)
            for (name, router), ms in zip(routers.items(), times):
                _, rmap = router(x)
                load = rmap.sum(0).double()
                routed = rmap.any(1)
                objective = float((scores * rmap.double()).sum())
                rows.append((distribution, tokens, experts, name, ms, float(load.max()), tokens / experts,
                             int((~routed).sum()), objective / optimum))
                print(f"  {distribution}, {tokens} tokens, {experts} experts, {name}: {ms:.2f} ms", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--warmup", type=int, default=20, help="training batches (with updates) before the measured one")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--distributions", nargs="+", choices=["gaussian", "clustered"], default=["gaussian", "clustered"])
    a = p.parse_args(argv)
    _setup(a.threads)
    import megatron.core
    import torch

    rows = run(a.tokens, a.experts, a.hidden, a.warmup, a.repeats, a.distributions)
    print(f"\nMegatron-core routers, top-1, on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"megatron-core {megatron.core.__version__}; hidden {a.hidden}, fp32 routing, {a.warmup} warm-up batches, "
          f"median of {a.repeats}\n")
    print("| tokens | n | experts | router | ms / call | max / mean tokens per expert | dropped | "
          "objective / exact optimum |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for distribution, tokens, experts, name, ms, hi, mean, dropped, ratio in rows:
        print(f"| {distribution} | {tokens} | {experts} | {name} | {ms:.2f} | {hi / mean:.2f} ({int(hi)} / {mean:g}) | {dropped} | "
              f"{ratio:.4f} |")


if __name__ == "__main__":
    main()
