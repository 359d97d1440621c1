"""The ``"base_layer"`` section of a DeepSpeed JSON config: schema, validation, reading and stripping.

    "base_layer": {
        "enabled": true,                 # false: the section is removed and nothing is swapped
        "moe_layers": true,              # replace every deepspeed.moe.layer.MoE in the model
        "modules": ["blocks.*.moe"],     # and/or modules whose name matches (fnmatch) — MoE or plain FFN
        "ffn_template": "blocks.{}.mlp", # and/or plain FFNs at these positions ({} = position)
        "ffn_positions": [1, 3],
        "num_experts": 8,                # needed for plain FFNs; for MoE layers it must match if given
        "ep_size": 2,                    # expert-parallel size (default: the MoE layer's, 1 for FFNs)
        "experts": "keep",               # "keep": the existing weights; "paper": fresh paper experts
        "sublayers": 1, "ffn_dim": null, # paper experts only: residual sublayers and their width
        "shuffle": true,                 # shuffle tokens over the expert-parallel group (training)
        "assignment": "exact",           # training routing: "exact" | "greedy"
        "inference": "greedy",           # eval routing: "greedy" | "exact"
        "centroids": "gate",             # MoE layers: start from the top-k gate's rows, or "default"
        "hidden_size": null              # plain FFNs: d when it cannot be read from a Linear
    }

Every problem raises ValueError naming the key, the value given and what is allowed.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional, Tuple

SECTION = "base_layer"


@dataclass
class BaseLayerConfig:
    enabled: bool = True
    moe_layers: bool = True
    modules: List[str] = field(default_factory=list)
    ffn_template: Optional[str] = None
    ffn_positions: List[int] = field(default_factory=list)
    num_experts: Optional[int] = None
    ep_size: Optional[int] = None
    experts: str = "keep"
    sublayers: int = 1
    ffn_dim: Optional[int] = None
    shuffle: bool = True
    assignment: str = "exact"
    inference: str = "greedy"
    centroids: str = "gate"
    hidden_size: Optional[int] = None

    def ffn_names(self) -> List[str]:
        return [self.ffn_template.replace("{}", str(i)) for i in self.ffn_positions] if self.ffn_template else []


_CHOICES = {"experts": ("keep", "paper"), "assignment": ("exact", "greedy"), "inference": ("greedy", "exact"),
            "centroids": ("gate", "default")}
_BOOLS = ("enabled", "moe_layers", "shuffle")
_POSITIVE = ("num_experts", "ep_size", "sublayers", "ffn_dim", "hidden_size")
_OPTIONAL = ("num_experts", "ep_size", "ffn_dim", "hidden_size", "ffn_template")


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f'"{SECTION}.{key}" = {value!r} is not valid: allowed {allowed}')


def parse_section(section: Any) -> BaseLayerConfig:
    """Validate the section (a dict) and return a :class:`BaseLayerConfig`; ValueError on any problem."""
    if not isinstance(section, dict):
        raise ValueError(f'"{SECTION}" must be a JSON object, got {section!r}')
    known = [f.name for f in fields(BaseLayerConfig)]
    for key in section:
        if key not in known:
            raise ValueError(f'unknown key "{SECTION}.{key}" (value {section[key]!r}); allowed keys: {known}')
    cfg = BaseLayerConfig()
    for key, value in section.items():
        if value is None and key in _OPTIONAL:
            setattr(cfg, key, None)
            continue
        if key in _BOOLS and not isinstance(value, bool):
            raise _bad(key, value, "true or false")
        if key in _POSITIVE and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _bad(key, value, "a positive integer" + (" or null" if key in _OPTIONAL else ""))
        if key in _CHOICES and value not in _CHOICES[key]:
            raise _bad(key, value, f"one of {list(_CHOICES[key])}")
        if key == "modules" and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            raise _bad(key, value, "a list of module-name patterns (strings, fnmatch syntax)")
        if key == "ffn_template" and not (isinstance(value, str) and "{}" in value):
            raise _bad(key, value, 'a module name with "{}" where the position goes, e.g. "blocks.{}.mlp"')
        if key == "ffn_positions" and not (isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise _bad(key, value, "a list of non-negative integers")
        setattr(cfg, key, copy.deepcopy(value))
    if bool(cfg.ffn_positions) != bool(cfg.ffn_template):
        key, value = ("ffn_template", cfg.ffn_template) if cfg.ffn_positions else ("ffn_positions", cfg.ffn_positions)
        raise _bad(key, value, '"ffn_template" and "ffn_positions" given together (one names the modules, the '
                   "other the positions)")
    if cfg.num_experts is not None and cfg.ep_size is not None and cfg.num_experts % cfg.ep_size:
        raise _bad("num_experts", cfg.num_experts, f"a multiple of ep_size={cfg.ep_size}")
    if cfg.experts == "keep" and (cfg.sublayers != 1 or cfg.ffn_dim is not None):
        key, value = ("sublayers", cfg.sublayers) if cfg.sublayers != 1 else ("ffn_dim", cfg.ffn_dim)
        raise _bad(key, value, 'only with "experts": "paper" (kept experts have their own shape)')
    if cfg.enabled and not (cfg.moe_layers or cfg.modules or cfg.ffn_positions):
        raise _bad("moe_layers", cfg.moe_layers, 'true, or some "modules" / "ffn_positions" to replace')
    return cfg


def check_world(cfg: BaseLayerConfig, world_size: int) -> None:
    """ep_size against the world size (ValueError naming the key)."""
    if cfg.ep_size is not None and (cfg.ep_size > world_size or world_size % cfg.ep_size):
        raise _bad("ep_size", cfg.ep_size, f"a divisor of the world size {world_size}: "
                   f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}")


def load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def split_config(config: Any) -> Tuple[Any, Optional[BaseLayerConfig]]:
    """``(config without the section, parsed section or None)``.

    ``config`` is a dict or a JSON file path (what ``deepspeed.initialize`` accepts); a dict is copied,
    never changed. A path whose file has no section is returned unchanged (DeepSpeed reads it itself).
    """
    if config is None:
        return None, None
    if isinstance(config, (str, os.PathLike)):
        data = load_json(os.fspath(config))
        if SECTION not in data:
            return config, None
        config = data
    if not isinstance(config, dict):
        return config, None
    if SECTION not in config:
        return config, None
    clean = dict(config)
    section = clean.pop(SECTION)
    return clean, parse_section(section)
