"""The project's files that live beside the Python package: ``configs/``, ``examples/``, ``benchmarks/``.

In a source checkout (or an editable install) they are the repository's own directories. A wheel
carries the same files under ``base_plugin/share/`` (``setup.py`` copies them there at build time, so
there is no second copy in the repository to keep in sync).

    shipped("configs") / "paper" / "base-large.json"
"""
from __future__ import annotations

from pathlib import Path

KINDS = ("configs", "examples", "benchmarks")
_PACKAGE = Path(__file__).resolve().parent


def shipped(kind: str) -> Path:
    """The directory ``kind`` (one of :data:`KINDS`) of this installation.

    Looks in the wheel's ``base_plugin/share/<kind>`` first, then in the source tree that holds this
    package (recognised by its ``setup.py``). ValueError for an unknown kind; FileNotFoundError if the
    installation has neither (a wheel built without the shipped files).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    installed = _PACKAGE / "share" / kind
    if installed.is_dir():
        return installed
    source = _PACKAGE.parent
    if (source / "setup.py").is_file() and (source / kind).is_dir():
        return source / kind
    raise FileNotFoundError(f"base-plugin's {kind}/ directory is not installed: looked in {installed} and in a "
                            f"source tree at {source}")
