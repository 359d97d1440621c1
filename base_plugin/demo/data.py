"""Byte-level text for the demo: real English that ships with Python, or the user's own file.

Python's standard library carries the text of its documentation's topic pages in
``pydoc_data.topics`` (~465 KB of English prose and code), so the demo needs no download.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

VOCAB_SIZE = 256  # bytes


def load_text(path: Optional[str] = None) -> bytes:
    """The bytes of ``path``, or of Python's documentation topics when ``path`` is None.

    Raises ValueError for a missing or too short file (the demo needs some thousands of bytes)."""
    if path is None:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--data {path}: no such file")
    data = file.read_bytes()
    if len(data) < 10_000:
        raise ValueError(f"--data {path}: {len(data)} bytes is too short; give at least 10,000 bytes of text")
    return data


def split(data: bytes, val_fraction: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) LongTensors of byte values; validation is the last ``val_fraction``."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows: inputs [batch, seq] and next-byte targets [batch, seq]."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    rows = starts[:, None] + torch.arange(seq_len + 1)
    windows = tokens[rows]
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, count: int):
    """A fixed set of ``count`` validation batches (evenly spaced windows), the same for every model."""
    starts = torch.linspace(0, len(tokens) - seq_len - 2, count * batch_size).long()
    rows = starts[:, None] + torch.arange(seq_len + 1)
    windows = tokens[rows].view(count, batch_size, seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
