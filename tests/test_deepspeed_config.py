"""Single process, no process group: the "base_layer" section, BaseMoE's interface, the swap."""
import json
import warnings

import pytest
import torch
from torch import nn

import base_plugin.deepspeed as bds
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("section,words", [
    ({"num_expert": 4}, ["num_expert", "allowed keys", "num_experts"]),
    ({"shuffle": "yes"}, ["shuffle", "'yes'", "true or false"]),
    ({"num_experts": 4.0}, ["num_experts", "4.0", "positive integer"]),
    ({"num_experts": True}, ["num_experts", "True", "positive integer"]),
    ({"assignment": "sinkhorn"}, ["assignment", "'sinkhorn'", "exact", "greedy"]),
    ({"num_experts": 6, "ep_size": 4}, ["num_experts", "6", "multiple of ep_size=4"]),
    ({"ffn_positions": [1, 3]}, ["ffn_template", "None"]),
    ({"ffn_template": "h.mlp", "ffn_positions": [1]}, ["ffn_template", "'h.mlp'", "{}"]),
    ({"ffn_template": "h.{}.mlp", "ffn_positions": [-1]}, ["ffn_positions", "[-1]", "non-negative"]),
    ({"modules": "h.*.mlp"}, ["modules", "'h.*.mlp'", "list"]),
    ({"sublayers": 2}, ["sublayers", "2", "paper"]),
    ({"moe_layers": False}, ["moe_layers", "False", "modules"]),
])
def test_bad_section_names_key_value_and_allowed(section, words):
    with pytest.raises(ValueError) as info:
        bds.parse_section(section)
    for w in words:
        assert w in str(info.value)


def test_section_must_be_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        bds.parse_section(["num_experts", 4])


def test_check_world_rejects_ep_size_beyond_world():
    from base_plugin.deepspeed.config import check_world
    with pytest.raises(ValueError, match=r"ep_size.*8.*divisor of the world size 4: \[1, 2, 4\]"):
        check_world(bds.parse_section({"ep_size": 8}), 4)
    check_world(bds.parse_section({"ep_size": 2}), 4)


def test_split_config_dict_and_path(tmp_path):
    cfg = {"train_batch_size": 4, "base_layer": {"num_experts": 8, "ep_size": 2, "shuffle": False}}
    clean, sec = bds.split_config(cfg)
    assert "base_layer" in cfg and "base_layer" not in clean and clean["train_batch_size"] == 4
    assert (sec.num_experts, sec.ep_size, sec.shuffle, sec.assignment) == (8, 2, False, "exact")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    clean2, sec2 = bds.split_config(str(path))
    assert clean2 == clean and sec2 == sec
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"train_batch_size": 4}))
    assert bds.split_config(str(plain)) == (str(plain), None)
    with pytest.raises(ValueError, match="unknown key"):
        bds.split_config({"base_layer": {"bogus": 1}})


def test_initialize_rejects_bad_section_before_deepspeed_runs():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="num_experts"):
        bds.initialize(model=model, config={"train_batch_size": 1, "base_layer": {"num_experts": 3, "ep_size": 2}})
    with pytest.raises(ValueError, match="unknown key"):
        bds.initialize(model=model, config={"train_batch_size": 1, "base_layer": {"top_k": 1}})


# ---------------------------------------------------------------------------------------------- BaseMoE

def ffn(d=8, f=12):
    return nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))


def test_base_moe_is_a_deepspeed_moe_with_its_outputs():
    torch.manual_seed(0)
    moe = BaseMoE = bds.BaseMoE(8, ffn(), num_experts=4)
    assert isinstance(moe, MoE)
    assert (moe.num_experts, moe.num_local_experts, moe.ep_size, moe.expert_group_name) == (4, 4, 1, "ep_size_1")
    x = torch.randn(3, 8, 8)
    out, l_aux, counts = moe(x)
    assert out.shape == x.shape and l_aux.shape == () and float(l_aux) == 0.0
    assert counts.tolist() == [6, 6, 6, 6]  # 24 tokens, exactly balanced
    (out.sum() + l_aux).backward()
    names = dict(BaseMoE.named_parameters())
    assert set(names) == {f"deepspeed_moe.experts.deepspeed_experts.{i}.{p}" for i in range(4)
                          for p in ("0.weight", "0.bias", "2.weight", "2.bias", "base_centroid")}
    for p in names.values():
        assert is_moe_param(p) and p.group_name == "ep_size_1" and p.grad is not None


def test_topk_arguments_warn_and_used_token_is_rejected():
    with pytest.warns(UserWarning, match=r"ignores \{'k': 2, 'capacity_factor': 1.25\}.*exactly one expert"):
        moe = bds.BaseMoE(8, ffn(), num_experts=2, k=2, capacity_factor=1.25)
    with pytest.raises(ValueError, match="used_token"):
        moe(torch.randn(4, 8), used_token=torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bds.BaseMoE(8, ffn(), num_experts=2, k=1)  # defaults: no warning


def test_base_moe_argument_errors():
    with pytest.raises(ValueError, match="not divisible"):
        bds.BaseMoE(8, ffn(), num_experts=3, ep_size=2)
    moe = bds.BaseMoE(8, ffn(), num_experts=4, ep_size=2)  # like DeepSpeed's MoE: groups come later
    with pytest.raises(ValueError, match="no expert-parallel group yet"):
        moe.ep_rank
    with pytest.raises(ValueError, match="torch.distributed"):
        moe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="hidden_size"):
        bds.BaseMoE(0, ffn(), num_experts=4)


def test_split_params_into_moe_groups_for_optimizer():
    model = nn.Sequential(nn.Linear(8, 8), bds.BaseMoE(8, ffn(), num_experts=2, return_aux=False))
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                   "name": "all", "lr": 0.1})
    assert [g["name"] for g in groups] == ["all", "ep_size_1"]
    assert len(groups[0]["params"]) == 2 and all(not is_moe_param(p) for p in groups[0]["params"])
    assert len(groups[1]["params"]) == 10 and groups[1]["moe"] and groups[1]["lr"] == 0.1
    torch.optim.AdamW(groups).step()  # a valid optimizer spec


def test_residual_moe():
    torch.manual_seed(0)
    moe = bds.BaseMoE(8, ffn(), num_experts=2, use_residual=True)
    out, _, _ = moe(torch.randn(5, 8))
    assert out.shape == (5, 8) and not is_moe_param(moe.coefficient.weight) and not is_moe_param(moe.mlp[0].weight)


# ---------------------------------------------------------------------------------------------- swap

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(4):
            b = nn.Module()
            b.mlp = ffn()
            if i % 2:
                b.moe = MoE(8, ffn(), num_experts=4, ep_size=1, use_residual=(i == 3))
            self.blocks.append(b)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_swap_every_deepspeed_moe_keeps_expert_weights():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # distinct experts, so a mix-up would show
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = _snapshot(model)
    gates = {i: model.blocks[i].moe.deepspeed_moe.gate.wg.weight.detach().clone() for i in (1, 3)}
    assert bds.swap_layers(model, bds.parse_section({})) == ["blocks.1.moe", "blocks.3.moe"]
    after = _snapshot(model)
    dropped = {n for n in before if n not in after}
    assert dropped == {"blocks.1.moe.deepspeed_moe.gate.wg.weight", "blocks.3.moe.deepspeed_moe.gate.wg.weight"}
    for n in before.keys() - dropped:
        assert torch.equal(before[n], after[n]), n
    for i in (1, 3):
        moe = model.blocks[i].moe
        assert isinstance(moe, bds.BaseMoE) and moe.use_residual == (i == 3)
        cents = torch.stack([e.base_centroid for e in moe.local_experts])
        assert torch.equal(cents, gates[i])  # "centroids": "gate"
        out, l_aux, counts = moe(torch.randn(2, 6, 8))
        assert out.shape == (2, 6, 8) and counts.sum() == 12


def test_swap_plain_ffns_at_positions_copies_their_weights():
    torch.manual_seed(1)
    model = Net()
    before = _snapshot(model)
    names = bds.swap_layers(model, bds.parse_section(
        {"moe_layers": False, "ffn_template": "blocks.{}.mlp", "ffn_positions": [0, 2], "num_experts": 3}))
    assert names == ["blocks.0.mlp", "blocks.2.mlp"]
    for i in (0, 2):
        layer = model.blocks[i].mlp
        assert isinstance(layer, bds.BaseMoE) and layer.num_experts == 3
        for e in layer.local_experts:
            for k, p in e.named_parameters():
                if k != "base_centroid":
                    assert torch.equal(p, before[f"blocks.{i}.mlp.{k}"])
                    assert is_moe_param(p)
        y = layer(torch.randn(4, 5, 8))
        assert isinstance(y, torch.Tensor) and y.shape == (4, 5, 8)  # a tensor, like the FFN
    untouched = [n for n in before if not n.startswith(("blocks.0.mlp", "blocks.2.mlp"))]
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in untouched)


def test_swap_by_pattern_and_paper_experts():
    torch.manual_seed(2)
    model = Net()
    names = bds.swap_layers(model, bds.parse_section(
        {"moe_layers": False, "modules": ["blocks.[13].mlp"], "num_experts": 2, "experts": "paper",
         "sublayers": 2, "ffn_dim": 16}))
    assert names == ["blocks.1.mlp", "blocks.3.mlp"]
    layer = model.blocks[1].mlp
    assert len(layer.local_experts[0]) == 2 and layer.local_experts[0][0].ff1.out_features == 16
    assert not isinstance(model.blocks[1].moe, bds.BaseMoE)  # moe_layers: false


def test_swap_errors_name_the_key():
    model = Net()
    with pytest.raises(ValueError, match=r"modules.*'nothing\.\*'.*match"):
        bds.swap_layers(model, bds.parse_section({"modules": ["nothing.*"]}))
    with pytest.raises(ValueError, match=r"ffn_positions.*7.*blocks\.7\.mlp"):
        bds.swap_layers(model, bds.parse_section({"ffn_template": "blocks.{}.mlp", "ffn_positions": [7],
                                                  "num_experts": 2}))
    with pytest.raises(ValueError, match=r"num_experts.*None.*blocks\.0\.mlp"):
        bds.swap_layers(model, bds.parse_section({"moe_layers": False, "modules": ["blocks.0.mlp"]}))
    with pytest.raises(ValueError, match=r"num_experts.*8.*has 4 experts"):
        bds.swap_layers(model, bds.parse_section({"num_experts": 8}))
    with pytest.raises(ValueError, match=r"ep_size.*2.*divisor of the world size 1"):
        bds.swap_layers(model, bds.parse_section({"ep_size": 2}))


def test_loads_a_topk_moe_state_dict_gate_becomes_centroids():
    """A DeepSpeed top-k checkpoint's weights load into the swapped model (strict), the gate giving the centroids."""
    torch.manual_seed(3)
    old = Net()
    state = old.state_dict()
    torch.manual_seed(4)
    new = Net()
    bds.swap_layers(new, bds.parse_section({"centroids": "default"}))
    new.load_state_dict(state)  # strict
    for i in (1, 3):
        moe, top = new.blocks[i].moe, old.blocks[i].moe
        gate = top.deepspeed_moe.gate.wg.weight
        for g, (e, e_old) in enumerate(zip(moe.local_experts, top.deepspeed_moe.experts.deepspeed_experts)):
            assert torch.equal(e.base_centroid, gate[g])
            mine = {n: p for n, p in e.named_parameters() if n != "base_centroid"}
            theirs = dict(e_old.named_parameters())
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    with pytest.raises(RuntimeError, match="Unexpected"):
        new.load_state_dict({**state, "blocks.1.moe.bogus": torch.zeros(1)})
