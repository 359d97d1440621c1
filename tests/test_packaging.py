"""The wheel is the product: build it, install it into a fresh venv, use it from outside the checkout.

Also: the sdist carries what the test suite needs and builds the same wheel; a wheel built without a
C++ compiler (no CPU kernel) still works; importing any module of the package changes nothing outside it.
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = ["--ranks", "2", "--experts", "4", "--steps", "2", "--eval-every", "2", "--d-model", "32",
             "--layers", "3", "--batch", "2", "--seq-len", "32", "--eval-batches", "1"]


def _run(cmd, cwd, timeout=600, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _names(wheel: Path):
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """{"wheel": built from the tree, "sdist": the sdist, "plain": a wheel built from the sdist without a
    C++ compiler}."""
    out = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run(pip + ["-w", out / "tree", ROOT], cwd=out)
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", out / "sdist"], cwd=ROOT)
    sdist = next((out / "sdist").glob("*.tar.gz"))
    no_compiler = dict(os.environ, CC="false", CXX="false")
    _run(pip + ["-w", out / "plain", sdist], cwd=out, env=no_compiler)
    return {"wheel": next((out / "tree").glob("*.whl")), "sdist": sdist,
            "plain": next((out / "plain").glob("*.whl"))}


def test_sdist_builds_the_same_wheel_and_carries_the_tests(dist):
    import tarfile

    members = {m.split("/", 1)[1] for m in tarfile.open(dist["sdist"]).getnames() if "/" in m}
    for needed in ("pytest.ini", "tests/conftest.py", "tests/multirank.py", "configs/paper/base-large.json",
                   "base_plugin/assignment/_cpu_kernel.cpp", "examples/megatron/pretrain_gpt_base.py"):
        assert needed in members, needed
    kernel = {n for n in _names(dist["wheel"]) if n.startswith("base_plugin/assignment/_cpu_kernel")}
    assert len(kernel) == 1 and next(iter(kernel)).endswith(".so")  # built into the wheel with a compiler
    assert _names(dist["wheel"]) - kernel == _names(dist["plain"])  # same files, the kernel aside
    shipped = {n for n in _names(dist["wheel"]) if n.startswith("base_plugin/share/")}
    in_tree = {f"base_plugin/share/{p.relative_to(ROOT)}" for kind in ("configs", "examples", "benchmarks")
               for p in (ROOT / kind).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == in_tree


def test_one_version_number(dist):
    from base_plugin import __version__

    assert f"-{__version__}-" in dist["wheel"].name and dist["sdist"].name == f"base_plugin-{__version__}.tar.gz"
    assert not re.search(r"version\s*=\s*['\"]\d", (ROOT / "setup.py").read_text())


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh venv with the wheel installed the way the README says, and a working directory outside
    the checkout."""
    where = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", where / "env"], cwd=where)
    py = where / "env" / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0", f"{dist['wheel']}[demo]"], cwd=where, timeout=1200)
    work = where / "work"
    work.mkdir()
    return py, work


def test_wheel_works_from_outside_the_checkout(venv):
    py, work = venv
    bin_dir = py.parent
    found = _run([py, "-c", "import base_plugin, base_plugin.assignment as a; "
                  "print(base_plugin.__file__); print(a.kernel_available())"], cwd=work).split()
    assert str(py.parents[1]) in found[0] and str(ROOT) not in found[0] and found[1] == "True"

    plan = _run([bin_dir / "base-plugin", "plan", "--model", "base-small,base-standard,base-large,dense,moe-top1,"
                 "moe-top2", "--out", "plans"], cwd=work)
    assert "base-large" in plan
    launch = (work / "plans" / "base-large" / "launch.sh").read_text()
    example = next(w for w in launch.split() if w.endswith("pretrain_gpt_base.py"))
    assert Path(example).is_file() and str(py.parents[1]) in example
    assert json.loads((work / "plans" / "base-large" / "ds_config.json").read_text())["base_layer"]

    _run([bin_dir / "base-plugin", "demo", *TINY_DEMO, "--variants", "base", "--out", "demo"], cwd=work)
    metrics = json.loads((work / "demo" / "metrics.json").read_text())
    assert metrics["runs"][0]["load_max_over_mean"] == [1.0, 1.0]

    out = _run([bin_dir / "base-plugin", "reshard", "demo/checkpoints/base", "--ep-size", "1", "--out", "one"],
               cwd=work)
    assert out.split() == [str(Path("one") / "ep_rank_0_of_1.pt")]

    listed = _run([bin_dir / "base-plugin", "bench", "--help"], cwd=work)
    for name in ("assignment", "layer", "deepspeed_moe", "optim"):
        assert name in listed
    assert "--host-reads" in _run([bin_dir / "base-plugin", "bench", "assignment", "--help"], cwd=work)


def test_wheel_without_the_kernel_works(venv, dist):
    py, work = venv
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", dist["plain"]], cwd=work)
    out = _run([py, "-c", "import torch; from base_plugin.assignment import kernel_available, balanced_assignment; "
                "a = balanced_assignment(torch.randn(64, 4)); print(kernel_available(), torch.bincount(a).tolist())"],
               cwd=work)
    assert out.split() == ["False", "[16,", "16,", "16,", "16]"]
    assert "base-small" in _run([py.parent / "base-plugin", "plan", "--model", "base-small"], cwd=work)


# ---- no side effects ------------------------------------------------------------------------------

# Pass 1 imports every module (and so the third-party modules they use: megatron-core's own imports
# set TORCHINDUCTOR_CACHE_DIR, for one); pass 2 imports ours again from scratch against that baseline.
_IMPORT_EVERYTHING = r"""
import importlib, os, pkgutil, sys
import base_plugin
names = [m.name for m in pkgutil.walk_packages(base_plugin.__path__, "base_plugin.")
         if "._" not in m.name and not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
for name in [n for n in sys.modules if n == "base_plugin" or n.startswith("base_plugin.")]:
    del sys.modules[name]
before = dict(os.environ)
for name in names:
    importlib.import_module(name)
import deepspeed.ops
from megatron.core.transformer.moe.router import TopKRouter
print(len(names), dict(os.environ) == before, "__compatible_ops__" in vars(deepspeed.ops),
      "__new__" in vars(TopKRouter))
"""


def test_importing_the_package_changes_nothing(tmp_path):
    count, environ_same, ops_touched, router_patched = _run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], cwd=tmp_path).split()[-4:]
    assert int(count) > 30 and environ_same == "True"
    assert ops_touched == "False" and router_patched == "False"


def test_library_code_never_writes_the_environment():
    """The one exception: the launcher's rank processes get the rendezvous variables (MASTER_ADDR, ...)
    set in the child they are, before user code runs."""
    write = re.compile(r"os\.environ(\[[^]]+\]\s*=[^=]|\.(setdefault|update|pop|clear)\()|os\.(putenv|unsetenv)\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "base_plugin").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if write.search(line) and p.name != "launch.py"]
    assert offenders == []
