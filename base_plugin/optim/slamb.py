"""SLAMB: LAMB with sparse first-moment synchronisation and periodic parameter averaging.

Xu et al., "SLAMB: Accelerated Large Batch Training with Sparse Communication", ICML 2023. This is an
independent implementation of the algorithm; see :class:`SLAMB` for the exact contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .comm import CommStats, CountingComm, group_size
from .lamb import adam_direction, trust_ratio, update_moments_

_MASK64 = (1 << 63) - 1


def _is_pair(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2


def _check_hparams(d: dict) -> None:
    """Raise ``ValueError`` naming the first out-of-range per-group hyper-parameter in ``d``."""
    lr = d["lr"]
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0 or math.isinf(lr):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    betas = d["betas"]
    if not _is_pair(betas) or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    b3 = d["beta3"]
    if not isinstance(b3, (int, float)) or not 0.0 <= b3 <= 1.0:
        raise ValueError(f"beta3 must be in [0, 1], got {b3!r}")
    eps = d["eps"]
    if not isinstance(eps, (int, float)) or not eps >= 0.0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    wd = d["weight_decay"]
    if not isinstance(wd, (int, float)) or not wd >= 0.0 or math.isinf(wd):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {wd!r}")
    tc = d["trust_clip"]
    if (not _is_pair(tc) or not all(isinstance(c, (int, float)) for c in tc)
            or not 0.0 <= tc[0] <= tc[1] or math.isnan(tc[1])):
        raise ValueError(f"trust_clip must be a pair (c_min, c_max) with 0 <= c_min <= c_max, got {tc!r}")


def _period(compression: float) -> int:
    # round() absorbs the float error of 1/k (1/0.1 is 10.000000000000002 in some spellings of 0.1).
    return max(1, math.ceil(round(1.0 / compression, 9)))


@dataclass
class _Entry:
    """How one parameter is synchronised (fixed until the param groups change)."""

    param: torch.Tensor
    group_dict: dict
    index: int          # position in the optimizer's flat parameter list: keys the mask schedule
    pg: object          # torch.distributed process group (None = default group)
    world: int          # size of pg (1 = nothing to synchronise)
    dense: bool         # True: gradient averaged every step (exact LAMB); False: sparse first moment


class SLAMB(torch.optim.Optimizer):
    r"""LAMB for data parallelism with sparse communication (SLAMB, Xu et al., ICML 2023).

    Use it *instead of* gradient all-reduce: wrap the model in nothing (no DDP, or DDP / DeepSpeed with
    gradient averaging turned off), call ``loss.backward()`` on each rank's local batch, then
    ``optimizer.step()``. The optimizer communicates on its own, through ``torch.distributed`` on a
    process group (gloo on CPU, NCCL on GPU). Without an initialised ``torch.distributed`` (or with a
    group of size 1) nothing is communicated and SLAMB is exactly :class:`LAMB`.

    **What is synchronised when** (``W`` = size of a parameter's process group, ``t`` = 1, 2, ... the step):

    * *Dense tensors* -- tensors with ``dim() <= 1`` or fewer than ``dense_threshold`` elements, and every
      tensor when ``compression == 1`` -- average their **gradient** over the group every step, before the
      moments are updated. They follow LAMB on the averaged gradient exactly, so they stay identical on
      all replicas and are never parameter-averaged.
    * *Sparse tensors* keep local moments ``m``, ``v`` updated with the local gradient; after that, a
      subset of ratio ``k = compression`` of the first moment ``m`` is averaged over the group (values
      only -- the positions are not sent). The second moment ``v`` stays local.
    * **Mask schedule** (a fixed random partition, not i.i.d. random-k): with ``P = ceil(1/k)``, each
      sparse tensor's elements are dealt at random into ``P`` equal slots (``randperm(numel) % P``, drawn
      from a generator seeded by ``(seed, index of the tensor in the optimizer)``); at step ``t`` the slot
      ``(t - 1) % P`` is synchronised. Every rank draws the same partition from the same seed, so no
      positions are ever sent; each step sends ``ceil(numel / P) <= ceil(k * numel)`` values per tensor,
      and every element is synchronised exactly once in any ``P`` consecutive steps (staleness is at
      most ``P - 1``). Random k-subsets redrawn every step would not give that guarantee.
    * **Staleness blending**: ``s`` = steps since an element of ``m`` was last synchronised (0 when this
      step). With ``M`` the elements synchronised this step, ``u`` the LAMB direction (bias-corrected
      Adam step plus ``weight_decay * x``), ``phi_M = clip(||x_M|| / ||u_M||)``, ``phi_rest`` likewise on the
      other elements, and ``r = beta3 ** s`` per element::

          x <- x - (r * lr * phi_M + (1 - r) * lr / sqrt(W) * phi_rest) * u

      i.e. fresh elements take the large-batch LAMB step, stale ones drift towards a local small-batch
      step (``lr / sqrt(W)``, trust ratio of the unsynchronised part).
    * **Parameter averaging**: after every step ``t`` with ``t % sync_interval == 0`` the sparse tensors'
      parameters are averaged over their group, so after each ``H``-step boundary all replicas hold
      identical parameters. ``sync_interval=None`` never averages (only sensible with ``compression=1``).
    * **Initial broadcast** (``broadcast_initial=True``): the constructor (and :meth:`add_param_group`)
      broadcasts every parameter from its group's first rank, so replicas start equal (a collective: all
      ranks construct the optimizer together). Its bytes are counted with the first step.

    **Process groups.** ``group`` (default: the default/WORLD group) synchronises every parameter unless
    its param group says otherwise: ``{"params": expert_params, "group": expert_data_parallel_group}``
    synchronises those parameters only within that group. Parameters marked the DeepSpeed way for expert
    parallelism (``param.allreduce = False`` and ``param.group_name``) in a param group without a
    ``"group"`` are looked up with ``group_resolver(param.group_name)``, else with DeepSpeed's expert
    data-parallel groups when DeepSpeed is importable and initialised; if neither resolves and more than
    one rank is running, the constructor raises ``ValueError`` (averaging different experts together
    would be silently wrong). All members of a group must build the optimizer with the same parameters
    in the same order, and call :meth:`step` the same number of times (the collectives are blocking).
    A parameter whose ``.grad`` is ``None`` is stepped with a zero gradient (keeps replicas' collectives
    aligned); parameters with ``requires_grad=False`` are skipped.

    **Communication accounting**: :attr:`comm_stats` (:class:`~base_plugin.optim.comm.CommStats`) holds the
    payload bytes handed to each collective call, recorded by the wrapper that issues them.

    **Checkpoints**: :meth:`state_dict` holds the moments, staleness counters, step counts and the
    schedule settings (``seed``, ``compression``, ``sync_interval``, ``dense_threshold``); the
    masks are regenerated from them, so :meth:`load_state_dict` resumes the trajectory bit for bit (given
    the same parameters, data and world). Process groups are not saved; the loading optimizer's groups
    are kept. :attr:`comm_stats` restarts from zero.

    Args:
        params: parameters or param-group dicts. Per-group keys: ``lr``, ``betas``, ``beta3``, ``eps``,
            ``weight_decay``, ``trust_clip``, ``group``.
        lr: learning rate, ``>= 0``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        beta3: staleness decay in ``[0, 1]`` (1: stale elements take the fresh step; 0: local step).
        compression: ``k`` in ``(0, 1]``, fraction of each sparse tensor's first moment sent per step.
        sync_interval: ``H``, an int ``>= 1`` (or ``None``): parameters averaged every ``H`` steps.
        weight_decay: ``>= 0``, added to the direction inside the trust ratio (LAMB).
        eps: ``>= 0``, added to ``sqrt(v_hat)``.
        trust_clip: ``(c_min, c_max)`` with ``0 <= c_min <= c_max``: the trust ratio is clipped to it.
        group: default process group (``None`` = default group).
        dense_threshold: int ``>= 0``; tensors with fewer elements are synchronised densely.
        seed: int ``>= 0`` keying the mask schedule; must be equal on all ranks.
        group_resolver: ``callable(group_name) -> ProcessGroup`` for expert parameters (see above).
        broadcast_initial: broadcast parameters from each group's first rank at construction.

    Raises:
        ValueError: a hyper-parameter out of range (the message names it and the allowed range), or an
            expert parameter whose process group cannot be resolved.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), beta3: float = 0.93,
                 compression: float = 0.1, sync_interval: Optional[int] = 100, weight_decay: float = 0.0,
                 eps: float = 1e-6, trust_clip=(0.01, 1000.0), group=None, *, dense_threshold: int = 9000,
                 seed: int = 0, group_resolver: Optional[Callable[[str], object]] = None,
                 broadcast_initial: bool = True):
        if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
                or not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if sync_interval is not None and (isinstance(sync_interval, bool) or not isinstance(sync_interval, int)
                                          or sync_interval < 1):
            raise ValueError(f"sync_interval must be an int >= 1 or None, got {sync_interval!r}")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, int) or dense_threshold < 0:
            raise ValueError(f"dense_threshold must be an int >= 0, got {dense_threshold!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.compression = float(compression)
        self.sync_interval = sync_interval
        self.dense_threshold = dense_threshold
        self.seed = seed
        self.default_group = group
        self.group_resolver = group_resolver
        self.broadcast_initial = broadcast_initial
        self._comm = CountingComm()
        self._plan_cache: Optional[list] = None
        self._slots: dict = {}
        defaults = dict(lr=lr, betas=tuple(betas) if _is_pair(betas) else betas, beta3=beta3, eps=eps,
                        weight_decay=weight_decay, trust_clip=tuple(trust_clip) if _is_pair(trust_clip)
                        else trust_clip, group=None)
        _check_hparams(defaults)
        self._broadcast_done: set = set()
        super().__init__(params, defaults)
        self._plan()  # resolve process groups now: errors surface at construction
        self._broadcast_new()

    # ------------------------------------------------------------------ configuration
    @property
    def period(self) -> int:
        """``P = ceil(1 / compression)``: every element of a sparse tensor is synchronised every ``P`` steps."""
        return _period(self.compression)

    @property
    def comm_stats(self) -> CommStats:
        """Payload bytes this optimizer handed to collectives (see :class:`CommStats`)."""
        return self._comm.stats

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _check_hparams(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        self._plan_cache = None
        if hasattr(self, "_broadcast_done"):  # groups added after construction: broadcast them now
            self._broadcast_new()

    def _broadcast_new(self) -> None:
        """Start every replica from its group's first rank: broadcast parameters not broadcast yet."""
        plan = self._plan()
        fresh = [e for e in plan if id(e.param) not in self._broadcast_done]
        self._broadcast_done.update(id(e.param) for e in fresh)
        if not self.broadcast_initial:
            return
        with torch.no_grad():
            for bucket in self._buckets([e for e in fresh if e.world > 1]):
                flat = torch.cat([e.param.reshape(-1) for e in bucket])
                self._comm.broadcast_(flat, bucket[0].pg, "broadcast")
                _scatter_(flat, [e.param for e in bucket])

    def _resolve_group(self, p: torch.Tensor, gd: dict):
        if gd.get("group") is not None:
            return gd["group"]
        if getattr(p, "allreduce", True) is False:
            name = getattr(p, "group_name", None)
            if self.group_resolver is not None:
                return self.group_resolver(name)
            pg = _deepspeed_expert_dp_group(name)
            if pg is not None:
                return pg
            if group_size(self.default_group) > 1:
                raise ValueError(
                    f"expert parameter (allreduce=False, group_name={name!r}) has no process group: pass "
                    "it in a param group {'params': [...], 'group': expert_data_parallel_group} or give "
                    "SLAMB(group_resolver=...)")
        return self.default_group

    def _plan(self) -> list:
        if self._plan_cache is None:
            plan, index = [], 0
            for gd in self.param_groups:
                for p in gd["params"]:
                    if p.requires_grad:
                        pg = self._resolve_group(p, gd)
                        w = group_size(pg)
                        dense = (self.period == 1 or p.dim() <= 1 or p.numel() < self.dense_threshold
                                 or w == 1)
                        plan.append(_Entry(p, gd, index, pg, w, dense))
                    index += 1
            self._plan_cache = plan
        return self._plan_cache

    @staticmethod
    def _buckets(entries) -> list:
        """Group entries by (process group, dtype, device), in order of first appearance."""
        out: dict = {}
        for e in entries:
            out.setdefault((id(e.pg), e.param.dtype, e.param.device), []).append(e)
        return list(out.values())

    # ------------------------------------------------------------------ mask schedule
    def _slot_tensor(self, e: _Entry) -> torch.Tensor:
        """Slot in ``[0, P)`` of each element: ``randperm(numel) % P`` drawn from ``(seed, index)``."""
        key = (e.index, self.period)
        slots = self._slots.get(key)
        if slots is None:
            p = e.param
            gen = torch.Generator(device=p.device)
            gen.manual_seed((self.seed * 1_000_003 + e.index) & _MASK64)
            slots = torch.randperm(p.numel(), generator=gen, device=p.device) % self.period
            slots = slots.to(torch.int32 if self.period > 32767 else torch.int16).view(p.shape)
            self._slots[key] = slots
        return slots

    def sync_mask(self, param: torch.Tensor, step: int) -> torch.Tensor:
        """Boolean mask of the elements of ``param``'s first moment averaged at ``step`` (1-based).

        All-true for dense tensors (their gradient is averaged) and for groups of size 1 (nothing to do).
        A pure function of ``(seed, compression, step, position of param)``: identical on every rank.
        """
        if step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        for e in self._plan():
            if e.param is param:
                if e.dense:
                    return torch.ones_like(param, dtype=torch.bool)
                return self._slot_tensor(e) == (step - 1) % self.period
        raise ValueError("param is not optimised by this optimizer")

    # ------------------------------------------------------------------ state
    def _init_state(self, e: _Entry) -> dict:
        st = self.state[e.param]
        if len(st) == 0:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(e.param, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(e.param, memory_format=torch.preserve_format)
        if not e.dense and "staleness" not in st:
            st["staleness"] = torch.zeros_like(e.param, dtype=torch.int32)
        return st

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("group", None)  # process groups are not serialisable; the loader keeps its own
        sd["slamb"] = dict(seed=self.seed, compression=self.compression, sync_interval=self.sync_interval,
                           dense_threshold=self.dense_threshold)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        cfg = state_dict.pop("slamb", None)
        groups = [g.get("group") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, pg in zip(self.param_groups, groups):
            g["group"] = pg
        if cfg is not None:
            self.seed = cfg["seed"]
            self.compression = cfg["compression"]
            self.sync_interval = cfg["sync_interval"]
            self.dense_threshold = cfg["dense_threshold"]
        for st in self.state.values():
            if "step" in st:
                st["step"] = int(st["step"])
        self._plan_cache = None
        self._slots.clear()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One SLAMB step (with its communication); returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        comm = self._comm
        states = {id(e.param): self._init_state(e) for e in plan}
        grads = {}
        for e in plan:
            g = e.param.grad
            if g is not None and g.is_sparse:
                raise RuntimeError("SLAMB does not support sparse gradients")
            grads[id(e.param)] = g if g is not None else torch.zeros_like(e.param)

        # 1. dense tensors: average the gradient
        for bucket in self._buckets([e for e in plan if e.dense and e.world > 1]):
            flat = torch.cat([grads[id(e.param)].reshape(-1) for e in bucket])
            comm.all_reduce_mean_(flat, bucket[0].pg, "grad")
            off = 0
            for e in bucket:
                n = e.param.numel()
                grads[id(e.param)] = flat[off:off + n].view_as(e.param)
                off += n

        # 2. moments with the (averaged or local) gradient
        for e in plan:
            st = states[id(e.param)]
            st["step"] += 1
            beta1, beta2 = e.group_dict["betas"]
            update_moments_(st["exp_avg"], st["exp_avg_sq"], grads[id(e.param)], beta1, beta2)

        # 3. sparse tensors: average the scheduled slice of the first moment
        masks = {}
        for bucket in self._buckets([e for e in plan if not e.dense]):
            for e in bucket:
                st = states[id(e.param)]
                masks[id(e.param)] = self._slot_tensor(e) == (st["step"] - 1) % self.period
            flat = torch.cat([states[id(e.param)]["exp_avg"][masks[id(e.param)]] for e in bucket])
            comm.all_reduce_mean_(flat, bucket[0].pg, "moment")
            off = 0
            for e in bucket:
                st, mask = states[id(e.param)], masks[id(e.param)]
                # slots are randperm % P: slot j holds ceil((numel - j) / P) elements (no host sync)
                phase = (st["step"] - 1) % self.period
                n = (e.param.numel() - phase + self.period - 1) // self.period
                st["exp_avg"].masked_scatter_(mask, flat[off:off + n])
                off += n
                st["staleness"].add_(1).masked_fill_(mask, 0)

        # 4. parameter update
        for e in plan:
            st, gd, x = states[id(e.param)], e.group_dict, e.param
            beta1, beta2 = gd["betas"]
            c_min, c_max = gd["trust_clip"]
            lr = gd["lr"]
            u = adam_direction(x, st["exp_avg"], st["exp_avg_sq"], st["step"], beta1, beta2, gd["eps"],
                               gd["weight_decay"])
            if e.dense:
                phi = trust_ratio(x.norm(), u.norm(), c_min, c_max)
                x.sub_(u * (phi * lr))
            else:
                mask = masks[id(x)]
                # squared norms of the synchronised part (a k-fraction copy) and of the rest (by difference)
                xm2, um2 = x.masked_select(mask).square().sum(), u.masked_select(mask).square().sum()
                xr2 = (x.square().sum() - xm2).clamp_min(0.0)
                ur2 = (u.square().sum() - um2).clamp_min(0.0)
                step_m = trust_ratio(xm2.sqrt(), um2.sqrt(), c_min, c_max) * lr
                step_r = trust_ratio(xr2.sqrt(), ur2.sqrt(), c_min, c_max) * (lr / math.sqrt(e.world))
                r = torch.pow(gd["beta3"], st["staleness"].to(x.dtype))
                # r * step_m + (1 - r) * step_r, per element
                x.sub_(r.mul_(step_m - step_r).add_(step_r).mul_(u))

        # 5. every H steps: average the sparse tensors' parameters
        if self.sync_interval is not None:
            due = [e for e in plan if not e.dense and states[id(e.param)]["step"] % self.sync_interval == 0]
            for bucket in self._buckets(due):
                flat = torch.cat([e.param.reshape(-1) for e in bucket])
                comm.all_reduce_mean_(flat, bucket[0].pg, "param")
                _scatter_(flat, [e.param for e in bucket])

        comm.end_step()
        return loss


class LAMB(SLAMB):
    """Plain LAMB (You et al., 2020) with dense gradient averaging: :class:`SLAMB` with ``compression=1``.

    Same code path as SLAMB: every tensor's gradient is averaged over its process group each step
    (one flat all-reduce per group), then the LAMB update is applied; replicas therefore stay identical
    and no parameter averaging is needed. Without ``torch.distributed`` it is single-process LAMB.
    Arguments as in :class:`SLAMB` (``beta3``, ``compression`` and ``sync_interval`` do not apply).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-6, trust_clip=(0.01, 1000.0), group=None, *,
                 group_resolver: Optional[Callable[[str], object]] = None, broadcast_initial: bool = True):
        super().__init__(params, lr=lr, betas=betas, beta3=1.0, compression=1.0, sync_interval=None,
                         weight_decay=weight_decay, eps=eps, trust_clip=trust_clip, group=group,
                         group_resolver=group_resolver, broadcast_initial=broadcast_initial)


def _scatter_(flat: torch.Tensor, params) -> None:
    off = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[off:off + n].view_as(p))
        off += n


def _deepspeed_expert_dp_group(name):
    """DeepSpeed's expert data-parallel group for ``name`` if DeepSpeed is importable and set up, else None."""
    if name is None:
        return None
    try:
        from deepspeed.utils import groups as ds_groups  # noqa: PLC0415 - optional dependency
    except Exception:  # noqa: BLE001 - not installed / broken install: no resolution
        return None
    try:
        return ds_groups._get_expert_data_parallel_group(name)
    except Exception:  # noqa: BLE001 - groups not initialised for that name
        return None
