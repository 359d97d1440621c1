"""The ``base-plugin`` command: ``demo``, ``plan``, ``reshard`` and ``bench``."""
from __future__ import annotations

import argparse
import runpy
import sys
from typing import List

from .resources import shipped


def _benchmarks() -> List[str]:
    try:
        return sorted(p.stem for p in shipped("benchmarks").glob("*.py") if not p.stem.startswith("_"))
    except FileNotFoundError:
        return []


def _run_benchmark(name: str, argv) -> int:
    """Run ``benchmarks/<name>.py`` of this installation as ``__main__`` with ``argv``."""
    script = shipped("benchmarks") / f"{name}.py"
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # the benchmarks' shared helper module sits beside them
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
    names = _benchmarks()
    bench = sub.add_parser("bench", add_help=False, help="run a benchmark from benchmarks/ and print its table "
                           "(`base-plugin bench NAME --help` for its options)")
    bench.add_argument("which", nargs="?", choices=names, metavar="NAME",
                       help=f"one of: {', '.join(names) or 'none installed'}")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench" and args.which is None:  # `bench`, `bench --help`: list them
        bench.print_help()
        return 0 if rest and rest[0] in ("-h", "--help") else 2
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
