"""Run a function on W local processes joined in a gloo process group on 127.0.0.1, with a timeout.

    results = run_ranks(fn, world_size, *args, timeout=120)

Used by the demo (``base-plugin demo`` trains on 2 CPU ranks by default) and by the multi-rank tests.

``fn(rank, world_size, *args)`` must be a module-level function (it is pickled for ``spawn``); its
return value (tensors welcome) comes back in ``results[rank]``. A rank that raises fails the call with
every failing rank's traceback; a hang past ``timeout`` seconds kills every rank and raises
``TimeoutError``. Ranks rendezvous through a file in a fresh temporary directory (no port to race
for); MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE are still set for libraries that read them.
"""
from __future__ import annotations

import io
import os
import queue
import signal
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GRACE_AFTER_ERROR = 10.0  # seconds the other ranks get to report after one failed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, store, args, results, threads, ignore_sigint, setup):
    if ignore_sigint:  # the parent turns Ctrl-C into its stop event; ranks finish their step cleanly
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    torch.set_num_threads(threads)
    try:
        if setup is not None:
            setup()
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles: they outlive this process
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, threads_per_rank: int = 1, stop_event=None,
              daemon: bool = True, setup=None):
    """See the module docstring. ``stop_event`` (a ``multiprocessing`` Event of the spawn context that
    ``fn`` also receives in ``args``): the first Ctrl-C sets it instead of killing the ranks, which are
    then expected to stop on their own and return; a second Ctrl-C aborts. ``daemon=False`` lets the
    ranks start processes of their own (Megatron's checkpoint writer does); they are killed at the end
    of the call either way. ``setup``: a module-level callable without arguments that every rank runs
    first, before joining the process group (e.g. ``base_plugin.deepspeed.use_cpu_accelerator``)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="multirank-") as tmp:
        store = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, store, args, results, threads_per_rank,
                                   stop_event is not None, setup),
                             daemon=daemon)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out, errors = {}, {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) + len(errors) < world_size:
                try:
                    rank, ok, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
                except KeyboardInterrupt:
                    if stop_event is None or stop_event.is_set():
                        raise
                    stop_event.set()
                    continue
                except queue.Empty:
                    if errors:
                        break
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no result within {timeout}s "
                                       f"(ranks done: {sorted(out)})") from None
                if ok:
                    out[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors[rank] = value
                    deadline = min(deadline, time.monotonic() + GRACE_AFTER_ERROR)
            if errors:
                raise RuntimeError(f"{fn.__name__} failed on {world_size} ranks\n"
                                   + "\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(errors.items())))
            return [out[r] for r in range(world_size)]
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
