"""``python -m unigeoseg_backend.service.trainer_launch PARENT_PID CONFIG.toml``: the trainer
(``python -m unigeoseg_trainer CONFIG.toml``) as the service's training jobs run it.

Two things are set first, in the child itself (the standard library only, so it starts fast):

- on Linux, the kernel kills it when the service process dies (``PR_SET_PDEATHSIG``): a
  backend killed mid-job leaves no trainer writing on;
- a lower CPU priority (``nice`` +10), so that the service's clicks and text prompts are
  answered first while it trains.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the service cleans up at its next start
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str]) -> None:
    parent_pid, config = int(argv[0]), argv[1]
    die_with_parent(parent_pid)
    try:
        os.nice(10)
    except (AttributeError, OSError):  # not on this platform, or not permitted
        pass
    sys.argv = ["unigeoseg_trainer", config]
    runpy.run_module("unigeoseg_trainer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
