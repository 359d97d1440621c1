"""Optimizers that do their own data-parallel communication.

* :class:`SLAMB` -- LAMB with sparse first-moment synchronisation (Xu et al., ICML 2023).
* :class:`LAMB` -- plain LAMB with dense gradient averaging, same code path (``SLAMB(compression=1)``).
* :class:`CountingComm` / :class:`CommStats` -- the collective wrapper that counts bytes sent, and
  :func:`allreduce_gradients_` to give any torch optimizer (e.g. AdamW) counted dense averaging.
"""
from .comm import CommStats, CountingComm, allreduce_gradients_
from .slamb import LAMB, SLAMB

__all__ = ["SLAMB", "LAMB", "CommStats", "CountingComm", "allreduce_gradients_"]
