"""The multi-rank harness the tests use: :func:`base_plugin.launch.run_ranks` (gloo CPU ranks on
127.0.0.1, file rendezvous, a timeout on every call)."""
from base_plugin.launch import free_port, run_ranks  # noqa: F401
