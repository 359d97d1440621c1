"""DeepSpeed's 1-bit LAMB (``OnebitLamb``, DeepSpeed 0.19.6) on gloo CPU ranks, for benchmarks/optim.py.

Environment (a separate venv: the package itself supports the current DeepSpeed, which no longer ships
the 1-bit optimizers), one command from the repository root::

    python3 -m venv /tmp/onebit && DS_BUILD_OPS=0 /tmp/onebit/bin/pip install -q "torch==2.13.0" "deepspeed==0.19.6" matplotlib -e .

1-bit LAMB (Li et al., 2021) runs through a DeepSpeed engine with ``"comm_backend_name": "compressed"``,
DeepSpeed's accelerator-agnostic compressed all-reduce (``deepspeed/runtime/comm/compressed.py``). On a
CPU accelerator two things stop it; both are bridged here, in the benchmark, never in the package, and
only inside :func:`onebit_lamb_bridges` (nothing is patched at import time):

* :class:`TorchPackbitsForMissingCpuBuild_DS0196` -- the backend loads its pack/unpack-bits op from
  ``PackbitsBuilder``, which DeepSpeed 0.19.6 builds only for XPU (``csrc/xpu/packbits/packing.cpp``);
  the CPU accelerator's builder raises "This op had not been implemented on CPU backend". The bridge is
  the same op in torch. It is on 1-bit LAMB's numerical path (the signs it packs are the compressed
  momentum), so it must match the kernel's semantics bit for bit: bit = 1 iff the float's sign bit is
  clear (``x >= +0``; ``-0.0`` packs as 0), eight values per byte, first value in the most significant
  bit, a zero-padded last byte; unpacking maps bit 1 -> +1.0 and 0 -> -1.0. :func:`check_packbits_bridge`
  compares it with ``numpy.packbits`` / ``numpy.unpackbits`` under that rule (DeepSpeed's NCCL backend
  packs with ``cupy.packbits``, NumPy's semantics) on every benchmark start and raises on any difference.
* :class:`GlooScalarAllGatherForCompressedBackend_DS0196` -- ``compressed_allreduce`` all-gathers the
  0-dim worker and server scales into lists of shape-(1,) buffers; gloo rejects a 0-dim input against
  shape-(1,) outputs (NCCL and the XPU path accept it). The bridge hands gloo the same value as a
  shape-(1,) view. Plumbing only: the same 4 bytes per rank move and land in the same buffers.

Bytes are counted the way benchmarks/optim.py counts its own optimizers: by wrapping the collective
calls (here ``torch.distributed``'s, which DeepSpeed's comm layer calls) and recording the payload each
rank hands over -- the tensor it sends (``all_reduce``: the tensor; ``all_gather``: its input;
``all_to_all_single``: its input). :class:`CollectiveBytes` splits them by purpose: the engine's dense
gradient all-reduce in the warm-up stage (``"grad"``), the packed signs (``"sign"``: the worker
all-to-all and the server all-gather) and scales (``"scale"``) of the compressed stage, the engine's
initial parameter broadcast (``"broadcast"``, not a training cost).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

DEEPSPEED_VERSION = "0.19.6"
INSTALL = ('python3 -m venv /tmp/onebit && DS_BUILD_OPS=0 /tmp/onebit/bin/pip install -q "torch==2.13.0" '
           '"deepspeed==0.19.6" matplotlib -e .')


def require_deepspeed_with_onebit_lamb():
    """Import DeepSpeed and check it is the version these bridges were written for (``RuntimeError`` if not)."""
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(f"1-bit LAMB needs deepspeed=={DEEPSPEED_VERSION}; set up its venv with: {INSTALL}") from e
    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise RuntimeError(f"1-bit LAMB: deepspeed {deepspeed.__version__} is installed, the bridges are for "
                           f"{DEEPSPEED_VERSION} (DeepSpeed removed OnebitLamb after it); set up its venv with: {INSTALL}")
    return deepspeed


# ---------------------------------------------------------------- bridge 1: packbits
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.int32)


class TorchPackbitsForMissingCpuBuild_DS0196:
    """Torch stand-in for the ``pack_bits`` op that ``CompressedBackend`` loads (XPU-only in DeepSpeed 0.19.6).

    Same call signature as the kernel's bindings: ``packbits(float_tensor, numel, rank) -> uint8[ceil(numel/8)]``
    and ``unpackbits(uint8_tensor, numel_bytes, rank) -> float32[8 * numel_bytes]``; ``rank`` (the kernel's
    device index) is unused on CPU. Semantics: see the module docstring.
    """

    @staticmethod
    def packbits(tensor: torch.Tensor, input_size: int, rank: int = 0) -> torch.Tensor:
        bits = ~torch.signbit(tensor.reshape(-1)[:input_size].float())
        pad = (-input_size) % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        return (bits.view(-1, 8).to(torch.int32) << _SHIFTS).sum(1).to(torch.uint8)

    @staticmethod
    def unpackbits(tensor: torch.Tensor, input_size: int, rank: int = 0) -> torch.Tensor:
        byte = tensor.reshape(-1)[:input_size].to(torch.int32)
        bits = (byte[:, None] >> _SHIFTS) & 1
        return bits.reshape(-1).to(torch.float32).mul_(2.0).sub_(1.0)


class _TorchPackbitsBuilder:
    """What ``CompressedBackend.__init__`` calls as ``PackbitsBuilder().load()``."""

    def load(self):
        return TorchPackbitsForMissingCpuBuild_DS0196()


def check_packbits_bridge(seed: int = 0) -> int:
    """Compare the bridge with NumPy's packbits/unpackbits under the kernel's rule; raise ``AssertionError`` on
    any difference. Covers random values, ``±0.0``, ``±inf``, NaN of both signs, denormals and lengths that
    are not multiples of 8. Returns the number of values checked."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-45, -1e-45,
                            1.0, -1.0, 3.4e38, -3.4e38])
    cases = [special] + [torch.randn(n, generator=gen) for n in (1, 7, 8, 9, 63, 64, 1000, 4099)]
    checked = 0
    bridge = TorchPackbitsForMissingCpuBuild_DS0196()
    for x in cases:
        ref = np.packbits(~np.signbit(x.numpy()), bitorder="big")
        got = bridge.packbits(x, x.numel(), 0)
        assert got.dtype == torch.uint8 and got.shape == (len(ref),), (got.dtype, got.shape, len(ref))
        assert np.array_equal(got.numpy(), ref), f"packbits differs from numpy.packbits on {x.numel()} values"
        ref_un = np.unpackbits(ref, bitorder="big").astype(np.float32) * 2 - 1
        # the backend transports packed signs as int8 and turns them back into uint8 before unpacking
        un = bridge.unpackbits(got.to(torch.int8).to(torch.uint8), got.numel(), 0)
        assert un.dtype == torch.float32 and np.array_equal(un.numpy(), ref_un), \
            f"unpackbits differs from numpy.unpackbits on {got.numel()} bytes"
        assert torch.equal(un[:x.numel()], torch.where(torch.signbit(x), -1.0, 1.0)), "round trip lost a sign"
        checked += x.numel()
    return checked


# ---------------------------------------------------------------- bridge 2: gloo 0-dim all_gather
class GlooScalarAllGatherForCompressedBackend_DS0196:
    """The ``deepspeed.comm`` module as ``compressed.py`` of DeepSpeed 0.19.6 sees it, except ``all_gather``:
    a 0-dim input gathered into shape-(1,) outputs is passed to gloo as a shape-(1,) view of itself."""

    def __init__(self, comm_module):
        self._comm = comm_module

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_gather(self, tensor_list, tensor, *args, **kwargs):
        if tensor.dim() == 0 and all(t.shape == (1,) for t in tensor_list):
            tensor = tensor.reshape(1)
        return self._comm.all_gather(tensor_list, tensor, *args, **kwargs)


@contextlib.contextmanager
def onebit_lamb_bridges():
    """Install both bridges into ``deepspeed.runtime.comm.compressed`` (DeepSpeed 0.19.6) for the ``with`` body."""
    require_deepspeed_with_onebit_lamb()
    import deepspeed.comm
    import deepspeed.runtime.comm.compressed as compressed

    saved = compressed.PackbitsBuilder, compressed.dist
    compressed.PackbitsBuilder = _TorchPackbitsBuilder
    compressed.dist = GlooScalarAllGatherForCompressedBackend_DS0196(deepspeed.comm)
    try:
        yield
    finally:
        compressed.PackbitsBuilder, compressed.dist = saved


# ---------------------------------------------------------------- byte counting
_SENT_ARG = {"all_reduce": ("tensor", 0), "broadcast": ("tensor", 0), "all_gather": ("tensor", 1),
             "all_to_all_single": ("input", 1), "all_gather_into_tensor": ("input_tensor", 1),
             "reduce_scatter_tensor": ("input", 1), "send": ("tensor", 0), "isend": ("tensor", 0)}
_OTHER = ("reduce", "gather", "scatter", "all_to_all", "reduce_scatter", "all_reduce_coalesced", "recv", "irecv",
          "barrier")


class CollectiveBytes:
    """``with CollectiveBytes() as c: ...`` records the payload of every ``torch.distributed`` collective called
    inside: ``c.by_kind`` (bytes per purpose, see the module docstring), ``c.by_op`` (bytes per collective),
    ``c.total``, ``c.training_total`` (all but the initial broadcast). Collectives other than those 1-bit LAMB
    is known to call are recorded under their own name, so nothing goes uncounted unnoticed."""

    def __init__(self):
        self.by_kind, self.by_op, self._saved = {}, {}, {}

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    @property
    def training_total(self) -> int:
        return self.total - self.by_kind.get("broadcast", 0)

    def _kind(self, op: str, t: torch.Tensor) -> str:
        if op == "broadcast":
            return "broadcast"
        if op == "all_reduce" and t.is_floating_point():
            return "grad"
        if op in ("all_to_all_single", "all_gather") and not t.is_floating_point():
            return "sign"
        if op == "all_gather" and t.is_floating_point():
            return "scale"
        return op

    def _record(self, op: str, t) -> None:
        n = t.numel() * t.element_size() if torch.is_tensor(t) else 0
        kind = self._kind(op, t) if torch.is_tensor(t) else op
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        self.by_op[op] = self.by_op.get(op, 0) + n

    def __enter__(self):
        for op in list(_SENT_ARG) + list(_OTHER):
            orig = getattr(dist, op, None)
            if orig is None:
                continue
            self._saved[op] = orig
            name, pos = _SENT_ARG.get(op, (None, None))

            def wrapped(*a, _orig=orig, _op=op, _name=name, _pos=pos, **kw):
                sent = kw.get(_name, a[_pos] if _pos is not None and len(a) > _pos else None) if _name else None
                self._record(_op, sent)
                return _orig(*a, **kw)
            setattr(dist, op, wrapped)
        return self

    def __exit__(self, *exc):
        for op, orig in self._saved.items():
            setattr(dist, op, orig)
        self._saved = {}


# ---------------------------------------------------------------- the engine
def onebit_lamb_engine(model, *, micro_batch: int, world: int, lr: float, weight_decay: float, freeze_step: int,
                       betas=(0.9, 0.999)):
    """A DeepSpeed engine training ``model`` with ``OnebitLamb`` on the compressed backend (fp32, no ZeRO, no
    clipping). Call inside :func:`onebit_lamb_bridges`, after ``deepspeed.init_distributed``. The other
    1-bit settings are DeepSpeed's defaults (``coeff_beta`` 0.9: ``1 / (1 - coeff_beta) = 10 <= freeze_step``
    as its docstring asks; ``min_coeff`` 0.01, ``max_coeff`` 10, ``factor_*`` 4.0 / 0.5 / 0.1)."""
    deepspeed = require_deepspeed_with_onebit_lamb()
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch * world, "zero_optimization": {"stage": 0},
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
              "optimizer": {"type": "OneBitLamb",
                            "params": {"lr": lr, "betas": list(betas), "weight_decay": weight_decay,
                                       "freeze_step": freeze_step, "comm_backend_name": "compressed"}}}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, opt


if __name__ == "__main__":
    print(f"packbits bridge matches numpy.packbits/unpackbits on {check_packbits_bridge()} values")
