from setuptools import find_packages, setup

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
        "test": ["pytest>=7", "pytest-timeout>=2.1", "scipy>=1.9"],
        "deepspeed": ["deepspeed>=0.16"],
        "megatron": ["megatron-core>=0.14,<0.17"],
    },
    entry_points={"console_scripts": ["base-plugin=base_plugin.cli:main"]},
)
