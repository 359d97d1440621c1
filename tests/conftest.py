import os
import sys

# Multi-rank helpers live next to the tests; spawned ranks import them by this path too.
sys.path.insert(0, os.path.dirname(__file__))

# The suite trains DeepSpeed on CPU ranks (gloo), on a GPU machine too: its processes and the ranks
# they spawn inherit the choice. tests/test_cuda.py's GPU job switches its own ranks to CUDA.
import base_plugin.deepspeed  # noqa: E402

base_plugin.deepspeed.use_cpu_accelerator()
