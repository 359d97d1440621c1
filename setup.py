from setuptools import Extension, find_packages, setup

DEEPSPEED = ["deepspeed>=0.16"]
# Supported: 0.16.1 to the newest 0.19.x (base_plugin/megatron/compat.py). On Python 3.11 pip picks 0.16.1:
# 0.17+ declare Requires-Python >= 3.12 (their cp311 wheels work; see docs/megatron.md for installing them).
MEGATRON = ["megatron-core>=0.16.1,<0.20"]
DEMO = ["matplotlib>=3.5", "tensorboard>=2.10", "tqdm"]

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
    version="0.1.0",
    description="BASE layers (balanced assignment of experts) for DeepSpeed and Megatron-core, and the SLAMB optimizer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["base_plugin", "base_plugin.*"]),
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "deepspeed": DEEPSPEED,
        "megatron": MEGATRON,
        "demo": DEEPSPEED + DEMO,
        # the whole test suite: every integration is tested for real
        "test": ["pytest>=7", "pytest-timeout>=2.1", "scipy>=1.9"] + DEEPSPEED + MEGATRON + DEMO,
    },
    ext_modules=[cpu_kernel],
    entry_points={"console_scripts": ["base-plugin=base_plugin.cli:main"]},
)
