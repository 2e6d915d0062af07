"""A job's processes, found through /proc (Linux), signalled and waited for by pid.

A launcher does not say which pid holds which rank, so a rank's process is the one whose
command line holds the job's ``--output_dir`` (each job has its own) and whose environment
names its rank (Open MPI's ``OMPI_COMM_WORLD_RANK``, torchrun's ``RANK``, ...).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

MPI_RANK = "OMPI_COMM_WORLD_RANK"
PROC = Path("/proc")


def _command_lines():
    """(pid, argv as bytes) of every process that can still be read."""
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes()
            except OSError:
                continue


def rank_pids(output_dir: str | os.PathLike, var: str = MPI_RANK) -> dict[int, int]:
    """rank -> pid of the processes with ``output_dir`` among their arguments and ``var`` (the
    launcher's rank variable) in their environment; a launcher's own processes have no ``var``."""
    key, prefix = os.fspath(output_dir).encode(), f"{var}=".encode()
    found = {}
    for pid, cmdline in _command_lines():
        if key not in cmdline.split(b"\0"):
            continue
        try:
            env = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(prefix):
                found[int(item[len(prefix):])] = pid
    return found


def pids_mentioning(text: str | os.PathLike) -> list[int]:
    """Every live process whose command line contains ``text`` anywhere (a job's output
    directory: its launcher, ranks, joiners)."""
    key = os.fspath(text).encode()
    return [pid for pid, cmdline in _command_lines() if key in cmdline]


def command_line(pid: int) -> str:
    """The command line of ``pid`` with spaces between arguments; "" when it is gone."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, not yet reaped by its parent)."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_gone(pid: int, timeout: float, poll: float = 0.1) -> bool:
    """Whether ``pid`` is gone within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not is_gone(pid):
        if time.time() >= deadline:
            return False
        time.sleep(poll)
    return True


def send(pids, sig: int) -> None:
    """``sig`` to each pid that is still there."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def dump_stacks(pids, settle_s: float = 2.0) -> None:
    """Every thread's stack of each (possibly stopped) process into its log: SIGCONT, then
    SIGUSR1 (the trainer's faulthandler), then time to write."""
    pids = list(pids)
    for pid in pids:
        send([pid], signal.SIGCONT)
        send([pid], signal.SIGUSR1)
    if pids:
        time.sleep(settle_s)


def kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """End ``proc``'s process group (a job started in its own session) and reap ``proc``: with
    ``grace_s`` > 0 SIGTERM first and SIGKILL only if it is still there after ``grace_s``."""
    if grace_s > 0 and proc.poll() is None:
        send_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    send_group(proc, signal.SIGKILL)
    proc.wait()


def send_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
