"""Child-process plumbing shared by `serve`, the worker and its reaper."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal

_PR_SET_PDEATHSIG = 1
_pool_child = False


# The pid of the process that last forked (set just before each fork, so a child's copy names its
# parent): a parent that died between the fork and the prctl below is seen by comparing it. None in
# a process that has not forked since it imported this module (nothing to compare with).
_forked_from: int | None = None


def _remember_forker() -> None:
    global _forked_from
    _forked_from = os.getpid()


os.register_at_fork(before=_remember_forker)


def die_with_parent() -> None:
    """`preexec_fn` for a child: SIGTERM it when its parent dies, even by SIGKILL (Linux), so none is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if _forked_from is not None and os.getppid() != _forked_from:
        # The parent died before the signal was armed, so the kernel will never send it: end now.
        os._exit(1)


# One byte of memory shared with every process forked from here on (an anonymous mmap is
# MAP_SHARED): the worker's parent sets it when it starts to shut down, and its pool children,
# forked before or after, read it. Setting it is a single store, safe in a signal handler.
_stopping = mmap.mmap(-1, 1)


def mark_worker_stopping() -> None:
    _stopping[0] = 1


def worker_stopping() -> bool:
    """True once this process's worker (its Celery parent) began to shut down."""
    return _stopping[0] == 1


def mark_pool_child() -> None:
    """Called in each Celery pool child as it starts: it may end itself (a stuck job), and it is told
    to stop (SIGTERM, then the grace period) when the worker that forked it dies, even by SIGKILL."""
    global _pool_child
    _pool_child = True
    die_with_parent()


def in_pool_child() -> bool:
    return _pool_child
