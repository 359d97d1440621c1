"""BASE routing in Megatron-core's MoELayer, on CPU (gloo ranks on 127.0.0.1).

What runs here, on every supported megatron-core release (the README's command tests the newest 0.19.x,
scripts/test_megatron_versions.sh the others): MoELayer (SequentialMLP experts, allgather dispatcher,
EP 1) with BaseRouter from the spec route, forward/backward, exact per-rank balance, greedy in eval,
equality with base_plugin.layer.BaseLayer, state-dict round trip and layout; whole GPTModels built by
every route (spec helper, decoder-block spec, config flag) with the router type asserted inside them and
a forward/backward; the version check; the router's multi-rank parts (shuffle, per-rank assignment) on
2 ranks. Expert parallelism > 1 is in test_megatron_ep.py, GPU-only parts in test_megatron_gpu.py.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import megatron.core  # noqa: E402,F401 - the README test command installs base-plugin[megatron]

from multirank import run_ranks  # noqa: E402

from base_plugin.assignment import default_capacity  # noqa: E402

D, E, FFN = 16, 4, 24
TIMEOUT = 150


# ---------------------------------------------------------------- helpers (run inside the ranks)
def init_megatron(tp: int = 1, ep: int = 1):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    return ps


def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from base_plugin.megatron import base_config_kwargs

    kwargs = dict(num_layers=1, hidden_size=D, num_attention_heads=2, num_moe_experts=E, moe_ffn_hidden_size=FFN,
                  ffn_hidden_size=FFN, moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
                  add_bias_linear=False, bf16=False, params_dtype=torch.float32)
    kwargs.update(base_config_kwargs())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_parts(spec):
    """``(module, MoESubmodules)`` of an MoE-layer spec in the installed release's form."""
    from base_plugin.megatron.compat import moe_spec_parts

    parts = moe_spec_parts(spec)
    assert parts is not None, spec
    return parts


def moe_spec(**router_options):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from base_plugin.megatron import with_base_router

    return with_base_router(get_moe_module_spec(use_te=False, num_experts=E), **router_options)


def build(spec, config, seed=0):
    """Build a layer from its spec (a ModuleSpec or, from megatron-core 0.18, a partial: both are called)."""
    torch.manual_seed(seed)
    return spec(config=config)


def expert_fn(layer, e):
    """g_e: the layer's expert e as a function [n, d] -> [n, d] (EP 1: local index = global index)."""
    return lambda h: layer.experts.local_experts[e](h)[0]


def reference_output(layer, x, experts):
    """sum_e probs * g_e(x) token by token, from the router's own routing."""
    h = x.reshape(-1, D)
    out = torch.zeros_like(h)
    gate = torch.sigmoid(h @ layer.router.weight.t()).gather(1, experts[:, None])
    for e in range(E):
        rows = (experts == e).nonzero().flatten()
        if rows.numel():
            out[rows] = gate[rows] * expert_fn(layer, e)(h[rows])
    return out.view_as(x)


def counts(routing_map):
    return routing_map.sum(0)


# ---------------------------------------------------------------- spec route, single rank
def _spec_route(rank, world):
    from base_plugin.assignment import balanced_assignment, greedy_assignment
    from base_plugin.megatron import BaseRouter

    init_megatron()
    layer = build(moe_spec(), make_config())
    assert type(layer.router) is BaseRouter
    torch.manual_seed(1)
    x = torch.randn(10, 3, D, requires_grad=True)  # 30 tokens over 4 experts: 8, 8, 7, 7
    scores = (x.detach().reshape(-1, D) @ layer.router.weight.detach().t())

    layer.train()
    probs, rmap = layer.router(x)
    assert rmap.dtype == torch.bool and rmap.shape == (30, E) and bool((rmap.sum(1) == 1).all())
    assert sorted(counts(rmap).tolist()) == [7, 7, 8, 8]
    experts = rmap.int().argmax(1)
    assert torch.equal(experts, balanced_assignment(scores))  # the exact solver's answer, per rank
    assert torch.allclose(probs.gather(1, experts[:, None]).squeeze(1), torch.sigmoid(scores.gather(1, experts[:, None]).squeeze(1)))
    assert float(probs.masked_fill(rmap, 0).abs().sum()) == 0.0
    assert abs(float(layer.router.last_stats["gap"])) < 1e-4

    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    torch.testing.assert_close(out, reference_output(layer, x, experts), rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for name, p in [("router.weight", layer.router.weight), ("input", x)] + [
            (n, p) for n, p in layer.experts.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    # the gradient reaches the centroids through the gate only: it equals the gate's own gradient
    layer.zero_grad(set_to_none=True)
    y = reference_output(layer, x.detach(), experts)
    y.square().sum().backward()
    ref_grad = layer.router.weight.grad.clone()
    layer.zero_grad(set_to_none=True)
    layer(x.detach())[0].square().sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, ref_grad, rtol=1e-5, atol=1e-6)

    # eval: greedy argmax, unbalanced allowed; inference="exact" keeps the balance
    layer.eval()
    with torch.no_grad():
        _, rmap_eval = layer.router(x)
    assert torch.equal(rmap_eval.int().argmax(1), greedy_assignment(scores))
    exact_eval = build(moe_spec(inference="exact"), make_config())
    exact_eval.load_state_dict(layer.state_dict())
    exact_eval.eval()
    with torch.no_grad():
        _, rmap_exact = exact_eval.router(x)
    assert torch.equal(rmap_exact.int().argmax(1), balanced_assignment(scores))

    # padding tokens take part in no assignment and are routed nowhere
    layer.train()
    pad = torch.zeros(10, 3, dtype=torch.bool)
    pad[7:, 1] = True  # 3 padding tokens -> 27 real ones
    probs, rmap = layer.router(x, padding_mask=pad)
    flat = pad.reshape(-1)
    assert not rmap[flat].any() and float(probs[flat].abs().sum()) == 0.0
    assert sorted(counts(rmap).tolist()) == [6, 7, 7, 7]
    assert torch.equal(rmap[~flat].int().argmax(1), balanced_assignment(scores[~flat]))
    out, _ = layer(x, padding_mask=pad.t())  # MoELayer takes the mask as [batch, seq]
    assert float(out[pad].abs().sum()) == 0.0 and bool((out[~pad].abs().sum(-1) > 0).all())
    return True


def test_spec_route_forward_backward_balance_eval():
    assert run_ranks(_spec_route, 1, timeout=TIMEOUT) == [True]


# ---------------------------------------------------------------- equality with BaseLayer
class _Residual(torch.nn.Module):
    """f_e(x) = x + g_e(norm(x)) built from a Megatron expert (weights shared, not copied)."""

    def __init__(self, expert, norm=None):
        super().__init__()
        self.expert, self.norm = expert, norm

    def forward(self, h):
        return h + self.expert(h if self.norm is None else self.norm(h))[0]


def _equal_to_base_layer(rank, world):
    from base_plugin.layer import BaseLayer
    from base_plugin.megatron import BasePaperMoELayer, get_gpt_layer_with_base_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

    init_megatron()
    # paper form: from a full GPT layer spec; pre_mlp_layernorm moves into the MoE layer
    layer_spec = get_gpt_layer_with_base_spec(E, use_te=False, paper_form=True, shuffle=False)
    assert layer_spec.submodules.pre_mlp_layernorm is IdentityOp
    # Megatron's own TransformerLayer around it, attention left out (the local attention's forward
    # forks Megatron's CUDA RNG tracker): its residual add turns the MoE output into the paper's mix
    block = copy.deepcopy(layer_spec)
    block.submodules.input_layernorm = IdentityOp
    block.submodules.self_attention = IdentityOp
    block.submodules.self_attn_bda = IdentityFuncOp
    cases = [("plain", moe_spec(shuffle=False)), ("paper", layer_spec.submodules.mlp), ("transformer layer", block)]
    for name, spec in cases:
        whole = build(spec, make_config(hidden_dropout=0.0, bias_dropout_fusion=False), seed=3)
        layer = whole.mlp if name == "transformer layer" else whole
        norm = None
        if name != "plain":
            assert isinstance(layer, BasePaperMoELayer)
            norm = layer.expert_norm
            with torch.no_grad():  # a non-trivial affine, so the test sees where the norm is applied
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
        base = BaseLayer(D, [_Residual(e, norm) for e in layer.experts.local_experts], E, shuffle=False)
        with torch.no_grad():
            base.centroids.copy_(layer.router.weight)
        for training in (True, False):
            layer.train(training)
            base.train(training)
            torch.manual_seed(5)
            x = torch.randn(9, 4, D)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            if name == "transformer layer":
                y_meg = whole(x1)[0]
            else:
                y_meg = x1 + layer(x1)[0]  # what the transformer layer's residual add makes of it
            y_base = base(x2)
            torch.testing.assert_close(y_meg, y_base, rtol=1e-5, atol=1e-5, msg=f"{name} training={training}")
            if training:
                assert torch.equal(layer.router.last_stats["tokens_per_expert"], base.last_stats.tokens_per_expert)
                w = torch.randn_like(x)
                layer.zero_grad(set_to_none=True)
                base.centroids.grad = None
                (y_meg * w).sum().backward()
                (y_base * w).sum().backward()
                torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(layer.router.weight.grad, base.centroids.grad, rtol=1e-4, atol=1e-5)
    return True


def test_equal_to_base_layer_plain_paper_form_and_transformer_layer():
    assert run_ranks(_equal_to_base_layer, 1, timeout=TIMEOUT) == [True]


def test_paper_form_spec_rewrite():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_decoder_block_spec
    from megatron.core.transformer.identity_op import IdentityOp

    from base_plugin.megatron import BasePaperMoELayer, BaseRouter, with_base_router
    from base_plugin.megatron.compat import MoELayer, TopKRouter

    original = get_gpt_layer_local_spec(num_experts=E)
    norm = original.submodules.pre_mlp_layernorm
    spec = with_base_router(original, paper_form=True)
    module, sub = moe_parts(spec.submodules.mlp)
    assert module is BasePaperMoELayer and sub.expert_norm is norm and sub.router is BaseRouter
    assert spec.submodules.pre_mlp_layernorm is IdentityOp
    assert not any(k.startswith("pre_mlp_layernorm") for k in spec.submodules.sharded_state_dict_keys_map)
    # the input spec is untouched
    module, sub = moe_parts(original.submodules.mlp)
    assert module is MoELayer and sub.router is TopKRouter
    assert original.submodules.pre_mlp_layernorm is norm
    # options travel as a partial
    router = moe_parts(with_base_router(original, shuffle=False).submodules.mlp)[1].router
    assert router.func is BaseRouter and router.keywords == {"shuffle": False}
    # decoder-block specs: every MoE layer, dense layers left alone; paper form once per layer even
    # where the release repeats one layer-spec object in the block (0.19)
    config = make_config(num_layers=4, moe_layer_freq=[1, 0, 1, 0])
    for paper_form in (False, True):
        block = with_base_router(get_gpt_decoder_block_spec(config, use_transformer_engine=False, pp_rank=0),
                                 paper_form=paper_form)
        parts = [moe_spec_or_none(s.submodules.mlp) for s in block.layer_specs]
        assert parts[1] is None and parts[3] is None
        for i in (0, 2):
            assert parts[i][1].router is BaseRouter
            assert parts[i][0] is (BasePaperMoELayer if paper_form else MoELayer)
            if paper_form:
                assert parts[i][1].expert_norm is not IdentityOp
                assert block.layer_specs[i].submodules.pre_mlp_layernorm is IdentityOp
    with pytest.raises(ValueError, match="no MoE layer"):
        with_base_router(get_gpt_layer_local_spec())
    with pytest.raises(ValueError, match="unknown BaseRouter option.*capacity"):
        with_base_router(original, capacity=2)


def moe_spec_or_none(spec):
    from base_plugin.megatron.compat import moe_spec_parts

    return moe_spec_parts(spec)


# ---------------------------------------------------------------- config route and misuse
V, S, B = 64, 16, 3


def _gpt_models(rank, world):
    """Whole GPTModels built by every route that asks for BASE: BASE routers inside each MoE layer."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec as megatron_block_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from base_plugin.megatron import (BasePaperMoELayer, BaseRouter, build_gpt_model, check_base_routers,
                                      get_gpt_decoder_block_spec, get_gpt_layer_with_base_spec, spec_for_config,
                                      with_base_router)
    from base_plugin.megatron.compat import TopKRouter

    init_megatron()
    cfg = make_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    stock = get_gpt_layer_local_spec(num_experts=E)  # TopKRouter named in it
    kw = dict(vocab_size=V, max_sequence_length=S)
    routes = {
        "spec helper": lambda: GPTModel(config=cfg, transformer_layer_spec=with_base_router(stock, shuffle=False), **kw),
        "ready-made spec, paper form": lambda: GPTModel(
            config=cfg, transformer_layer_spec=get_gpt_layer_with_base_spec(E, use_te=False, paper_form=True), **kw),
        "config flag: build_gpt_model, stock layer spec": lambda: build_gpt_model(
            cfg, stock, router_options=dict(shuffle=False), **kw),
        "config flag: decoder-block spec": lambda: GPTModel(
            config=cfg, transformer_layer_spec=get_gpt_decoder_block_spec(cfg, use_transformer_engine=False), **kw),
        "config flag: spec_for_config, paper form": lambda: GPTModel(
            config=cfg, transformer_layer_spec=spec_for_config(megatron_block_spec(cfg, use_transformer_engine=False),
                                                               cfg, paper_form=True), **kw),
    }
    for name, make in routes.items():
        torch.manual_seed(0)
        model = make()
        routers = check_base_routers(model)
        assert len(routers) == cfg.num_layers and all(isinstance(r, BaseRouter) for r in routers), name
        assert all(isinstance(m.mlp, BasePaperMoELayer) == ("paper" in name) for m in model.decoder.layers), name
        # the MoE layers inside the model route the BASE way (the whole model's forward needs CUDA:
        # the local attention forks Megatron's CUDA RNG tracker)
        h = torch.randn(S, B, D)
        probs, rmap = model.decoder.layers[0].mlp.router(h)
        assert torch.equal(rmap.sum(0), default_capacity(S * B, E)), name

    # what Megatron itself builds from a stock spec ignores "base": check_base_routers says so
    plain = GPTModel(config=cfg, transformer_layer_spec=stock, **kw)
    assert type(plain.decoder.layers[0].mlp.router) is TopKRouter
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.router is a TopKRouter.*megatron-core"):
        check_base_routers(plain)
    # other configs get exactly Megatron's specs and models
    other = make_config(num_layers=2, moe_router_load_balancing_type="aux_loss")
    assert spec_for_config(stock, other) is stock
    model = build_gpt_model(other, stock, **kw)
    assert all(type(m.mlp.router) is TopKRouter for m in model.decoder.layers)
    # misuse through the config route names the option
    for bad, option in [(dict(moe_router_topk=2, moe_router_score_function="softmax"), "moe_router_topk"),
                        (dict(moe_aux_loss_coeff=0.01), "moe_aux_loss_coeff"),
                        (dict(moe_z_loss_coeff=0.001), "moe_z_loss_coeff")]:
        with pytest.raises(ValueError, match=option) as info:
            build_gpt_model(make_config(num_layers=2, **bad), stock, **kw)
        assert "allowed" in str(info.value)
    return True


def test_gpt_model_is_base_on_every_route():
    assert run_ranks(_gpt_models, 1, timeout=TIMEOUT) == [True]


def test_version_check_names_installed_and_supported():
    from base_plugin.megatron import compat

    assert compat.check_version("0.16.1") == (0, 16, 1) and compat.check_version("0.19.2rc1") == (0, 19, 2)
    assert compat.SUPPORTED[0] <= compat.VERSION < compat.SUPPORTED[1]
    for bad in ("0.16.0", "0.15.3", "0.20.0", "1.0.0"):
        with pytest.raises(ImportError, match=rf"megatron-core {re.escape(bad)} is installed; supported: "
                                              r"megatron-core >= 0\.16\.1, < 0\.20"):
            compat.check_version(bad)


def test_misuse_errors_name_the_option():
    from base_plugin.megatron import check_base_config

    for bad, option in [(dict(moe_router_topk=2), "moe_router_topk"),
                        (dict(moe_router_load_balancing_type="aux_loss", moe_expert_capacity_factor=1.25),
                         "moe_expert_capacity_factor"),
                        (dict(moe_aux_loss_coeff=1e-2), "moe_aux_loss_coeff"),
                        (dict(moe_router_enable_expert_bias=True), "moe_router_enable_expert_bias"),
                        (dict(moe_input_jitter_eps=0.1), "moe_input_jitter_eps"),
                        (dict(moe_router_load_balancing_type="sinkhorn"), "moe_router_load_balancing_type")]:
        with pytest.raises(ValueError, match=option) as info:
            check_base_config(make_config(**bad))
        assert "allowed" in str(info.value)
    # Megatron's own check already refuses a capacity factor with the "base" type, naming it too
    with pytest.raises(ValueError, match="moe_expert_capacity_factor"):
        make_config(moe_expert_capacity_factor=1.0)
    with pytest.raises(ValueError, match="unknown option.*capacity"):
        from base_plugin.megatron import BaseRouter
        BaseRouter(make_config(), capacity=2)
    check_base_config(make_config())  # the BASE settings pass
    check_base_config(make_config(moe_router_load_balancing_type="aux_loss"))  # coeff 0: harmless


def test_missing_megatron_message(monkeypatch):
    import builtins

    import base_plugin.megatron as bm

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("megatron"):
            raise ImportError("No module named 'megatron'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'base-plugin\[megatron\]'"):
        bm._require_megatron()


# ---------------------------------------------------------------- checkpoints
def _state_dicts(rank, world):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    init_megatron()
    a = build(moe_spec(shuffle=False), make_config(), seed=11)
    b = build(moe_spec(shuffle=False), make_config(), seed=12)
    x = torch.randn(8, 2, D)
    assert not torch.allclose(a(x)[0], b(x)[0])
    missing, unexpected = b.load_state_dict(a.state_dict())
    assert not missing and not unexpected
    for training in (True, False):
        a.train(training)
        b.train(training)
        torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)
    # distributed-checkpoint layout: the centroids are one replicated [E, d] tensor, like TopKRouter's
    sd = a.sharded_state_dict(prefix="decoder.layers.0.mlp.")
    w = sd["decoder.layers.0.mlp.router.weight"]
    assert isinstance(w, ShardedTensor) and w.key == "decoder.layers.0.mlp.router.weight"
    assert tuple(w.global_shape) == (E, D) and tuple(w.global_offset) == (0, 0)
    assert torch.equal(w.data, a.router.weight)
    return {k: (v.key, tuple(v.global_shape), tuple(v.global_offset)) for k, v in sd.items()
            if isinstance(v, ShardedTensor)}


def test_state_dict_round_trip_and_sharded_layout():
    (layout,) = run_ranks(_state_dicts, 1, timeout=TIMEOUT)
    keys = {v[0] for v in layout.values()}
    assert "decoder.layers.0.mlp.router.weight" in keys
    assert any("experts" in k for k in keys)


# ---------------------------------------------------------------- two ranks: shuffle, per-rank assignment
def _two_ranks(rank, world, token_sets):
    init_megatron()  # tp 1, ep 1: the data-parallel (tp_dp_cp) group holds both ranks
    return [_two_ranks_case(rank, tokens) for tokens in token_sets]


def _two_ranks_case(rank, tokens):
    import torch.distributed as dist

    from base_plugin.assignment import balanced_assignment
    from base_plugin.megatron import BaseRouter

    config = make_config()
    torch.manual_seed(0)
    shuffled = BaseRouter(config, shuffle=True)
    local = BaseRouter(config, shuffle=False)
    local.load_state_dict(shuffled.state_dict())
    n = tokens[rank]
    torch.manual_seed(100 + rank)
    x = torch.randn(n, 1, D, requires_grad=True)
    scores = x.detach().reshape(-1, D) @ shuffled.weight.detach().t()
    result = {}

    # without shuffle: each rank solves its own tokens, exactly
    _, rmap = local(x)
    experts = rmap.int().argmax(1)
    assert torch.equal(experts, balanced_assignment(scores))
    assert torch.equal(counts(rmap), default_capacity(n, E))

    # with shuffle: the solved sets are random mixes of both ranks' tokens
    torch.manual_seed(7 + rank)
    probs, rmap = shuffled(x)
    assert bool((rmap.sum(1) == 1).all())
    st = shuffled.last_stats
    solved = int(st["tokens_per_expert"].sum())
    assert torch.equal(st["tokens_per_expert"], default_capacity(solved, E))
    assert abs(float(st["gap"])) <= 1e-4 * (1 + abs(float(st["objective"])))  # exact on the received set
    # the routing that came back is the one that was solved: objectives add up across the group
    mine = scores.gather(1, rmap.int().argmax(1)[:, None]).sum()
    totals = torch.stack([mine, st["objective"].to(mine.dtype)]).double()
    dist.all_reduce(totals)
    assert abs(float(totals[0] - totals[1])) < 1e-4 * (1 + abs(float(totals[1])))
    total_counts = counts(rmap).long()
    dist.all_reduce(total_counts)
    result["global_counts"] = total_counts.tolist()
    result["solved"] = solved
    result["moved"] = bool((rmap.int().argmax(1) != experts).any())
    probs.sum().backward()
    assert shuffled.weight.grad is not None and x.grad is not None

    # eval: no shuffle, greedy, no collective
    shuffled.eval()
    _, rmap_eval = shuffled(x)
    assert torch.equal(rmap_eval.int().argmax(1), scores.argmax(1))

    # a whole MoELayer on both ranks (data parallel 2, EP 1) with the shuffle on
    layer = build(moe_spec(), config, seed=4)
    torch.manual_seed(200 + rank)
    h = torch.randn(n, 1, D, requires_grad=True)
    out, _ = layer(h)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and h.grad is not None and layer.router.weight.grad is not None
    return result


def test_two_ranks_shuffle_and_per_rank_assignment():
    token_sets = [(24, 24), (10, 30), (0, 12)]  # equal, uneven, and a rank without tokens
    per_rank = run_ranks(_two_ranks, 2, token_sets, timeout=TIMEOUT)
    for i, tokens in enumerate(token_sets):
        _check_two_ranks(tokens, [r[i] for r in per_rank])


def _check_two_ranks(tokens, results):
    total = sum(tokens)
    # each rank receives an even share of the shuffled tokens, and each share is balanced exactly
    assert sorted(r["solved"] for r in results) == sorted(default_share(total, 2))
    expected = sum(torch.tensor(default_share(r["solved"], E)) for r in results).tolist()
    for r in results:
        assert r["global_counts"] == expected
    assert any(r["moved"] for r in results)  # the shuffle did change which tokens were solved together


def default_share(total, world):
    return [total // world + (1 if i < total % world else 0) for i in range(world)]
