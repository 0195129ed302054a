"""Processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec only the prctl call itself may run.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(signal_number: int) -> None:
    """Have the kernel send ``signal_number`` to this process when its parent dies (Linux; elsewhere nothing).

    torchrun starts each rank in a session of its own, so a ``kill -9`` of the stage's process group
    missed them and they went on writing checkpoints that a re-run raced.
    """
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(PR_SET_PDEATHSIG, signal_number)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
