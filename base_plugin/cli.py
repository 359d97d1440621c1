"""The ``base-plugin`` command: ``demo`` and ``bench``."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run_benchmark(name: str, argv) -> int:
    script = BENCHMARKS / f"{name}.py"
    if not script.exists():
        raise SystemExit(f"base-plugin: {script} not found; benchmarks run from a source checkout "
                         "(pip install -e .)")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="base-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train BASE vs DeepSpeed top-1/top-2 vs dense on CPU (see --help)", add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ and print its table")
    bench.add_argument("which", choices=sorted(p.stem for p in BENCHMARKS.glob("*.py")) or ["assignment"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from base_plugin.demo import main as demo

        return demo(rest)
    return _run_benchmark(args.which, rest)


if __name__ == "__main__":
    sys.exit(main())
