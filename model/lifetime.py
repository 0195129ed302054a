"""Processes that do not outlive the process that started them."""

from __future__ import annotations

import os
import sys


def die_with_parent(signal_number: int) -> None:
    """Have the kernel send ``signal_number`` to this process when its parent dies (Linux; elsewhere nothing).

    torchrun starts each rank in a session of its own, so a ``kill -9`` of the stage's process group
    missed them and they went on writing checkpoints that a re-run raced.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal_number)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
