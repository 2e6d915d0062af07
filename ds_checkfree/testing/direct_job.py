"""A job without any launcher: a coordinator and every member started by hand (``--join``).

How a job runs where there is no MPI (the GPU machine, a volunteer swarm), and how a real
death is checked on NCCL with several ranks on one GPU: each member is made its own "host" to
NCCL (``member_env``). Member ids are given in registration order, not by a launcher, so which
member holds which slot is read from the coordinator's first plan and each member's first line.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from ds_checkfree.testing import procs
from ds_checkfree.testing.launch import REPO, standalone_env, train_args
from ds_checkfree.testing.records import last_step, read_metrics


def member_env(i: int, accelerator: str) -> dict:
    """A process started by hand: no launcher's variables; on CUDA every member on GPU 0, each
    its own host to NCCL (``NCCL_HOSTID``: NCCL refuses two ranks of one communicator on one GPU
    of one host)."""
    if accelerator == "cuda":
        return standalone_env(accelerator, NCCL_HOSTID=f"host{i}", CUDA_VISIBLE_DEVICES="0", LOCAL_RANK="0",
                              NCCL_SOCKET_IFNAME="lo")
    return standalone_env(accelerator)


def member_pids(logs: list[Path]) -> dict[int, int]:
    """member id -> pid, from each member's first line ("[member X] host pid P: member of ...")."""
    found = {}
    for log in logs:
        m = re.search(r"\[member (\d+)\] \S+ pid (\d+): member of the job", log.read_text(errors="replace"))
        if m:
            found[int(m.group(1))] = int(m.group(2))
    return found


def start_up_roles(coordinator_log: Path) -> dict[int, int | None]:
    """member id -> slot of the first generation (None: a spare), from the coordinator's plan line."""
    m = re.search(r"generation 1: roles (\{[^}]*\})", coordinator_log.read_text(errors="replace"))
    if not m:
        return {}
    return {int(k): (None if v == "None" else int(v)) for k, v in re.findall(r"(\d+): (\d+|None)", m.group(1))}


def launcher_ranks(roles: dict[int, int | None], pids: dict[int, int]) -> dict[int, int]:
    """What a launcher's ranks would be: slot -> pid of the first generation's slot holders, then
    the spares numbered on from the last slot (in member id order)."""
    holders = {slot: pids[m] for m, slot in roles.items() if slot is not None and m in pids}
    spares = sorted(m for m, slot in roles.items() if slot is None)
    first_spare = sum(slot is not None for slot in roles.values())
    return {**holders, **{first_spare + k: pids[m] for k, m in enumerate(spares) if m in pids}}


class DirectJob:
    """``processes`` members of a job of ``num_stages`` x ``dp`` slots, and their coordinator,
    started now; the subset of ``Job``'s interface a benchmark follows a job by (``proc`` is the
    coordinator, which ends with the job)."""

    def __init__(self, config: str | Path, output_dir: str | Path, steps: int, processes: int, *, num_stages: int,
                 dp: int = 1, accelerator: str = "cpu", model: str = "tiny", extra: list | tuple = (),
                 python: str = sys.executable, timeout_s: float = 120.0):
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.python, self.accelerator_name, self.processes = python, accelerator, processes
        self.coordinator_log = self.out / "coordinator.log"
        self.logs: list[Path] = [self.coordinator_log]
        announce = self.out / "coordinator.json"
        announce.unlink(missing_ok=True)
        self.proc = self._start([python, "-m", "ds_checkfree.elastic.membership.coordinator", "--deepspeed_config",
                                 str(config), "--expect", str(processes), "--dp", str(dp), "--num_stages",
                                 str(num_stages), "--host", "127.0.0.1", "--port", "0", "--announce", str(announce)],
                                self.coordinator_log, member_env(0, "cpu"))
        self.members: list[subprocess.Popen] = []
        deadline = time.time() + timeout_s
        while not (announce.exists() and announce.stat().st_size):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the coordinator did not announce itself (see {self.coordinator_log})")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{json.loads(announce.read_text())['port']}"
        self.train_args = [*train_args(config, self.out, steps, model=model, extra=extra), "--join", self.address]
        for i in range(processes):
            self.add_member(i)

    def _start(self, cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def add_member(self, i: int) -> subprocess.Popen:
        """Start member process ``i`` (``i`` picks its NCCL host id and its log): a joiner once
        the job runs."""
        log = self.out / f"member{i}.log"
        self.logs.append(log)
        proc = self._start([self.python, *self.train_args], log, member_env(i, self.accelerator_name))
        self.members.append(proc)
        return proc

    def records(self) -> list[dict]:
        return read_metrics(self.out, missing_ok=True)

    def last_step(self) -> dict | None:
        return last_step(self.records())

    def rank_pids(self) -> dict[int, int]:
        return launcher_ranks(start_up_roles(self.coordinator_log), member_pids(self.logs))

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop(self, dump_stacks: bool = False) -> None:
        live = [p for p in [self.proc, *self.members] if p.poll() is None]
        if dump_stacks:
            procs.dump_stacks(p.pid for p in live if p is not self.proc)
        for p in live:
            procs.kill_group(p)
