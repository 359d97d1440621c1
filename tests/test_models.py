"""The GPT-style LM of base_plugin.models: builds (meta and real), runs on CPU, counts, config checks."""
import pytest
import torch

from base_plugin.layer import BaseLayer, is_expert_parameter
from base_plugin.models import GPT, GPTConfig, Inserted, TopKMoE, build_meta
from base_plugin.planner import count_model

V, S, D, L, H, F, E, SUB = 61, 16, 32, 4, 4, 48, 4, 2


def tiny(**kw):
    base = dict(vocab_size=V, max_seq_len=S, d_model=D, n_layers=L, n_heads=H, ffn_dim=F, num_experts=E,
                expert_sublayers=SUB, expert_ffn_dim=40, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def hand_count(cfg):
    """Independent arithmetic for the tiny configs (not the planner's code path)."""
    d, f, fe = cfg.d_model, cfg.ffn, cfg.expert_ffn
    ends = cfg.vocab_size * d + cfg.max_seq_len * d + 2 * d + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    attn = 3 * d * d + 3 * d + d * d + d + 4 * d                    # qkv, proj, two LayerNorms
    ffn = d * f + f + f * d + d
    sub = 2 * d + d * fe + fe + fe * d + d                          # LN, Linear d->fe, Linear fe->d
    n = len(cfg.positions)
    if cfg.sparse == "base":
        return ends + cfg.n_layers * (attn + ffn) + n * cfg.num_experts * (cfg.expert_sublayers * sub + d)
    if cfg.sparse == "dense":
        return ends + cfg.n_layers * (attn + ffn) + n * cfg.expert_sublayers * sub
    if cfg.sparse == "moe":
        moe = d * cfg.num_experts + cfg.num_experts * (d * fe + fe + fe * d + d)
        return ends + cfg.n_layers * attn + (cfg.n_layers - n) * ffn + n * moe
    return ends + cfg.n_layers * (attn + ffn)


CONFIGS = [tiny(sparse="base"), tiny(sparse="base", sparse_positions=(0, 2, 4)), tiny(sparse="dense"),
           tiny(sparse="moe", top_k=2), tiny(sparse="moe", top_k=1, sparse_positions=(0,)), tiny(sparse="none"),
           tiny(sparse="base", tie_embeddings=False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.sparse}{list(c.positions)}-tie{int(c.tie_embeddings)}")
def test_meta_build_counts_equal_real_build_and_hand_count(cfg):
    meta = build_meta(cfg)
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(0)
    real = GPT(cfg)
    assert not any(p.is_meta for p in real.parameters())
    c_meta, c_real = count_model(meta), count_model(real)
    assert c_meta == c_real
    assert c_meta.total == hand_count(cfg)
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in real.named_parameters()]


def test_batched_and_listed_experts_have_the_same_counts():
    cfg = tiny(sparse="base")
    assert count_model(build_meta(cfg)) == count_model(build_meta(cfg, batched_experts=False))


def test_base_model_trains_on_cpu_forward_backward_finite_and_balanced():
    torch.manual_seed(0)
    cfg = tiny(sparse="base")
    model = GPT(cfg)
    idx = torch.randint(0, V, (2, S))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (2, S - 1, V) and torch.isfinite(loss)
    loss.backward()
    base = [m.layer for m in model.layers if isinstance(m, Inserted)]
    assert len(base) == 1 and isinstance(base[0], BaseLayer)
    stats = base[0].last_stats
    counts = stats.tokens_per_expert.tolist()            # 30 tokens over 4 experts: exactly balanced
    assert sum(counts) == 2 * (S - 1) and max(counts) - min(counts) <= 1
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # fresh experts are the identity (last Linear zero), so the gate has no gradient yet; after a few
    # optimizer steps on one batch the experts differ from x, the centroids learn and the loss drops
    assert grads["layers.2.layer.centroids"].abs().sum() == 0
    centroids = base[0].centroids.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(15):
        opt.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert not torch.equal(base[0].centroids.detach(), centroids)


@pytest.mark.parametrize("sparse,top_k", [("dense", 1), ("moe", 1), ("moe", 2), ("none", 1)])
def test_other_kinds_run_forward_backward(sparse, top_k):
    torch.manual_seed(0)
    model = GPT(tiny(sparse=sparse, top_k=top_k))
    idx = torch.randint(0, V, (2, S))
    _, loss = model(idx, idx)
    assert torch.isfinite(loss)
    loss.backward()
    if sparse == "moe":
        assert model.aux_loss is not None and torch.isfinite(model.aux_loss)
        assert all(p.grad is not None for p in model.parameters())


def test_eval_mode_uses_greedy_routing_and_same_shapes():
    torch.manual_seed(0)
    model = GPT(tiny(sparse="base")).eval()
    idx = torch.randint(0, V, (3, 7))
    with torch.no_grad():
        logits, loss = model(idx)
    assert logits.shape == (3, 7, V) and loss is None


def test_positions_and_layer_names():
    cfg = tiny(sparse="base", sparse_positions=(4, 0, 2))
    model = build_meta(cfg)
    kinds = ["I" if isinstance(m, Inserted) else "B" for m in model.layers]
    assert "".join(kinds) == "IBBIBBI"
    assert model.layer_names() == ["layers.0.layer", "layers.3.layer", "layers.6.layer"]
    from base_plugin.planner.launch import dense_twin_layer_names
    assert dense_twin_layer_names(cfg) == model.layer_names()
    assert tiny(sparse="base").positions == (L // 2,)
    assert tiny(sparse="moe").positions == (1, 3)
    moe = build_meta(tiny(sparse="moe"))
    assert [isinstance(b.ffn, TopKMoE) for b in moe.layers] == [False, True, False, True]


def test_expert_parameters_are_marked_and_shared_ones_are_not():
    model = build_meta(tiny(sparse="base"))
    marked = {n for n, p in model.named_parameters() if is_expert_parameter(p)}
    assert marked and all(n.startswith("layers.2.layer.") for n in marked)
    assert "tok_emb.weight" not in marked and "layers.0.attn.qkv.weight" not in marked


def test_dense_twin_has_the_active_parameters_of_the_base_model():
    base, dense = count_model(build_meta(tiny(sparse="base"))), count_model(build_meta(tiny(sparse="dense")))
    assert base.active == dense.total + D          # one expert per token, plus its centroid


def test_moe_factory_hook_is_used():
    made = []

    def factory(cfg, i):
        made.append(i)
        return TopKMoE(cfg.d_model, 8, cfg.num_experts, 1)

    model = GPT(tiny(sparse="moe", sparse_positions=(0, 3)), moe_factory=factory)
    assert made == [0, 3]
    assert model.layers[3].ffn.w1.shape == (E, D, 8)


def test_topk_moe_drops_over_capacity_and_keeps_shape():
    torch.manual_seed(0)
    moe = TopKMoE(8, 16, num_experts=4, top_k=1, capacity_factor=0.25)
    x = torch.randn(5, 8, 8)                      # 40 tokens, capacity ceil(40 * 0.25 / 4) = 3 per expert
    out, aux, counts = moe(x)
    assert out.shape == x.shape and torch.isfinite(aux)
    assert int(counts.sum()) == 40 and int(moe.last_dropped) >= 40 - 4 * 3
    dropped_rows = (out.reshape(-1, 8).abs().sum(-1) == 0).sum()
    assert int(dropped_rows) == int(moe.last_dropped)


@pytest.mark.parametrize("change,needle", [
    (dict(sparse="topk"), "sparse"), (dict(n_heads=5), "n_heads"),
    (dict(sparse="base", sparse_positions=(9,)), "sparse_positions"),
    (dict(sparse="moe", sparse_positions=(4,)), "sparse_positions"), (dict(sparse="moe", top_k=5), "top_k"),
    (dict(d_model=0), "d_model"), (dict(activation="tanh"), "activation"), (dict(dropout=1.5), "dropout"),
])
def test_config_errors_name_the_field(change, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**change)


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = tiny(sparse="base", sparse_positions=(1, 3))
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "m.json"
    import json
    path.write_text(json.dumps({"model": cfg.to_dict()}))
    assert GPTConfig.load(path) == cfg
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig.from_dict({"n_layer": 3})


def test_sequence_longer_than_positions_is_rejected():
    model = GPT(tiny(sparse="none"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, S + 1, dtype=torch.long))


def _two_rank_run(rank, world, cfg_dict):
    cfg = GPTConfig.from_dict(cfg_dict)
    torch.manual_seed(0)                       # same shared weights on every rank
    model = GPT(cfg)                           # group=None: the world, E / W experts per rank
    layer = model.layers[2].layer
    torch.manual_seed(10 + rank)               # different data per rank
    idx = torch.randint(0, V, (2, S))
    _, loss = model(idx, idx)
    loss.backward()
    return layer.num_local, loss.item(), layer.last_stats.tokens_per_expert.tolist()


def test_expert_parallel_on_two_cpu_ranks():
    from multirank import run_ranks
    cfg = tiny(sparse="base")
    results = run_ranks(_two_rank_run, 2, cfg.to_dict(), timeout=120)
    for num_local, loss, per_expert in results:
        assert num_local == E // 2 and loss == loss and sum(per_expert) == 2 * S
        assert max(per_expert) - min(per_expert) <= 1
