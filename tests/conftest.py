import os
import sys

# Multi-rank helpers live next to the tests; spawned ranks import them by this path too.
sys.path.insert(0, os.path.dirname(__file__))
