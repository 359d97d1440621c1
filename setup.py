import re
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "base_plugin" / "__init__.py").read_text(), re.M).group(1)

TORCH = "torch>=2.4"
DEEPSPEED = ["deepspeed>=0.16"]
MEGATRON = ["torch>=2.6", "megatron-core>=0.16.1,<0.17"]  # tested: 0.16.1
DEMO = ["matplotlib>=3.5", "tensorboard>=2.10", "tqdm"]

# Directories beside the package that the installed package reads (base_plugin.resources.shipped):
# copied into the wheel at build time, so the repository keeps one copy.
SHIPPED = ("configs", "examples", "benchmarks")


class BuildWithShippedFiles(build_py):
    """build_py that also copies ``configs/``, ``examples/`` and ``benchmarks/`` into
    ``base_plugin/share/`` of the build (not for editable installs, which read the source tree)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for kind in SHIPPED:
            target = Path(self.build_lib) / "base_plugin" / "share" / kind
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(HERE / kind, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


# The exact-assignment CPU kernel: plain C++ against the CPython API (no torch headers, builds in
# seconds). optional=True: without a compiler the install still succeeds and base_plugin.assignment
# uses its pure-torch path.
cpu_kernel = Extension(
    "base_plugin.assignment._cpu_kernel",
    sources=["base_plugin/assignment/_cpu_kernel.cpp"],
    extra_compile_args=["-O3", "-std=c++17"],
    language="c++",
    optional=True,
)

setup(
    name="base-plugin",
    version=VERSION,
    description="BASE layers (balanced assignment of experts) for DeepSpeed and Megatron-core, and the SLAMB optimizer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["base_plugin", "base_plugin.*"]),
    install_requires=[TORCH, "numpy"],
    extras_require={
        "deepspeed": DEEPSPEED,
        "megatron": MEGATRON,
        "demo": DEEPSPEED + DEMO,
        # the whole test suite: every integration is tested for real
        "test": ["pytest>=7", "pytest-timeout>=2.1", "scipy>=1.9"] + DEEPSPEED + MEGATRON + DEMO,
    },
    ext_modules=[cpu_kernel],
    cmdclass={"build_py": BuildWithShippedFiles},
    entry_points={"console_scripts": ["base-plugin=base_plugin.cli:main"]},
)
