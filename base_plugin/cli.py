"""The ``base-plugin`` command: ``demo``, ``plan``, ``reshard`` and ``bench``."""
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
    sub.add_parser("plan", help="paper-scale planner: parameters, memory per GPU, launch configs (see --help)",
                   add_help=False)
    sub.add_parser("reshard", help="rewrite a DeepSpeed BASE checkpoint for another ep_size (see --help)",
                   add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ and print its table")
    bench.add_argument("which", choices=sorted(p.stem for p in BENCHMARKS.glob("*.py")) or ["assignment"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from base_plugin.demo import main as demo

        return demo(rest)
    if args.command == "plan":
        from base_plugin.planner.cli import main as plan

        return plan(rest)
    if args.command == "reshard":
        from base_plugin.deepspeed.reshard import main as reshard

        return reshard(rest)
    return _run_benchmark(args.which, rest)


if __name__ == "__main__":
    sys.exit(main())
