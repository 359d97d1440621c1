"""The ``base-plugin`` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="base-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo (for now: the exact-assignment benchmark)")
    bench = sub.add_parser("bench", help="run a benchmark and print its table")
    bench.add_argument("which", choices=["assignment"])
    args, rest = parser.parse_known_args(argv)
    if args.command in ("demo", "bench"):
        from base_plugin.benchmarks import assignment

        return assignment.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
