"""Parent-death signals: a child of a process that dies (even by SIGKILL) is told to stop, and one whose
parent died before the signal was armed ends at once instead of running on as an orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import worker.process
from worker.process import die_with_parent

REPO = Path(__file__).resolve().parents[2]
# A parent that starts a long sleep with the parent-death signal, prints its pid and waits.
PARENT = (
    "import subprocess, sys, time\n"
    "from worker.process import die_with_parent\n"
    "child = subprocess.Popen(['sleep', '120'], preexec_fn=die_with_parent)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_child_ends_when_its_parent_is_sigkilled() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()  # SIGKILL: no handler of the parent's runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_child_whose_parent_died_before_the_signal_was_armed_exits() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        # As if the parent had died between the fork and the prctl: the child was reparented.
        worker.process._forked_from = os.getppid() + 1_000_000
        die_with_parent()
        os._exit(0)  # not reached when the check works
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1
    assert worker.process._forked_from == os.getpid()  # set by the fork hook, in this process too
