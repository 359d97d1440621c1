"""Resharding BaseMoE checkpoints to another expert-parallel size.

**Inside DeepSpeed** build the model with the new ``ep_size`` (or set ``"base_layer": {"ep_size": N}``
for plain FFNs) and call

    base_plugin.deepspeed.load_checkpoint(engine, ckpt_dir, tag)

DeepSpeed writes one file per *global* expert (``layer_<l>_expert_<g>_mp_rank_00_model_states.pt``,
centroids included, see :mod:`.moe`) and every rank reads back the experts it owns under the new
``ep_size``; the optimizer state, which DeepSpeed stores by the old layout, is carried over per
parameter by :mod:`.resume` (``engine.load_checkpoint(ckpt_dir, tag, load_module_only=True)`` loads
the weights alone, the optimizer starting afresh).

**Outside DeepSpeed** (inference, conversion, inspection) this module reads such a checkpoint into plain
``state_dict``s for any ``ep_size``:

    state = load_state_dict(ckpt_dir, ep_size=1)               # one process, all experts
    state = load_state_dict(ckpt_dir, ep_size=4, ep_rank=2)    # what EP rank 2 of 4 holds
    model.load_state_dict(state)

and ``base-plugin reshard CKPT_DIR --ep-size N --out DIR`` (:func:`main`) writes
``DIR/ep_rank_<r>_of_<N>.pt`` for r in 0..N-1, each a ``torch.load``-able state dict.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
from typing import Dict, List, Optional

import torch

_EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."
_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def resolve_tag(ckpt_dir: str, tag: Optional[str] = None) -> str:
    """``tag`` or the one named in ``ckpt_dir/latest``; ValueError if neither exists."""
    if tag is None:
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"no tag given and no {latest!r}: pass --tag (one of {sorted(os.listdir(ckpt_dir))})")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise ValueError(f"checkpoint tag {tag!r} not found in {ckpt_dir!r}")
    return tag


def expert_files(ckpt_dir: str, tag: Optional[str] = None, mp_rank: int = 0) -> Dict[int, Dict[int, str]]:
    """``{moe layer id: {global expert id: path}}``; ValueError if a layer lacks experts."""
    tag = resolve_tag(ckpt_dir, tag)
    layers: Dict[int, Dict[int, str]] = {}
    for path in glob.glob(os.path.join(ckpt_dir, tag, "layer_*_expert_*_model_states.pt")):
        m = _FILE.search(os.path.basename(path))
        if m and int(m.group(3)) == mp_rank:
            layers.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    for layer, experts in layers.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"MoE layer {layer} of {ckpt_dir}/{tag}: expert files {sorted(experts)} are not 0..E-1")
    return layers


def _localize(key: str, ep_size: int, ep_rank: int, num_experts: int) -> Optional[str]:
    """Global expert key -> this rank's local key, or None when another rank owns the expert."""
    head, _, tail = key.partition(_EXPERTS)
    g_str, _, rest = tail.partition(".")
    local = num_experts // ep_size
    g = int(g_str)
    if not ep_rank * local <= g < (ep_rank + 1) * local:
        return None
    return f"{head}{_EXPERTS}{g - ep_rank * local}.{rest}"


def load_state_dict(ckpt_dir: str, ep_size: int = 1, ep_rank: int = 0, tag: Optional[str] = None,
                    mp_rank: int = 0) -> Dict[str, torch.Tensor]:
    """The model state dict EP rank ``ep_rank`` of ``ep_size`` holds, from a DeepSpeed checkpoint.

    Non-expert weights come from ``mp_rank_XX_model_states.pt``; each MoE layer's experts from its
    per-expert files, renumbered to local ids. ValueError if ``ep_size`` does not divide a layer's
    number of experts or ``ep_rank`` is out of range.
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"need ep_size >= 1 and 0 <= ep_rank < ep_size, got ep_size={ep_size}, ep_rank={ep_rank}")
    tag = resolve_tag(ckpt_dir, tag)
    main_file = os.path.join(ckpt_dir, tag, f"mp_rank_{mp_rank:02d}_model_states.pt")
    if not os.path.isfile(main_file):
        raise ValueError(f"{main_file!r} not found: is {ckpt_dir!r} a DeepSpeed checkpoint?")
    state = dict(torch.load(main_file, map_location="cpu", weights_only=False)["module"])
    for layer, experts in sorted(expert_files(ckpt_dir, tag, mp_rank).items()):
        num = len(experts)
        if num % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide the {num} experts of MoE layer {layer}")
        for g, path in sorted(experts.items()):
            for key, value in torch.load(path, map_location="cpu", weights_only=False).items():
                local = _localize(key, ep_size, ep_rank, num)
                if local is not None:
                    state[local] = value
    return state


def reshard(ckpt_dir: str, ep_size: int, out_dir: str, tag: Optional[str] = None) -> List[str]:
    """Write ``out_dir/ep_rank_<r>_of_<ep_size>.pt`` for every EP rank; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for r in range(ep_size):
        path = os.path.join(out_dir, f"ep_rank_{r}_of_{ep_size}.pt")
        torch.save(load_state_dict(ckpt_dir, ep_size, r, tag), path)
        paths.append(path)
    return paths


reshard_checkpoint = reshard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="base-plugin reshard",
        description="Write the model state of a DeepSpeed BaseMoE/MoE checkpoint as one plain state dict per "
                    "expert-parallel rank for a new ep_size. (To keep training with DeepSpeed under another "
                    "ep_size you do not need this: base_plugin.deepspeed.load_checkpoint(engine, dir) "
                    "reads the per-expert files for the new layout and carries the optimizer state.)")
    parser.add_argument("checkpoint", help="the directory given to engine.save_checkpoint")
    parser.add_argument("--ep-size", type=int, required=True, help="the new expert-parallel size")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one in CHECKPOINT/latest)")
    args = parser.parse_args(argv)
    try:
        paths = reshard(args.checkpoint, args.ep_size, args.out, args.tag)
    except ValueError as exc:
        parser.error(str(exc))
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
