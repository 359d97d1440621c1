import os
import sys

# Multi-rank helpers live next to the tests; spawned ranks import them by this path too.
sys.path.insert(0, os.path.dirname(__file__))

# The suite trains DeepSpeed on CPU (gloo), on a GPU machine too; ranks spawned by tests/multirank.py
# make the same choice themselves.
from multirank import cpu_accelerator  # noqa: E402

cpu_accelerator()
