"""One real job in the background: start it, follow its metrics, signal a rank, wait, end it.

The job runs in a session of its own (so ending it ends every process its launcher started)
with its output in one log file; its ranks are found through /proc by its ``--output_dir``.
Failures are exceptions (``TimeoutError``, ``LookupError``); a test turns them into
``pytest.fail`` with the log's tail, a benchmark into its own verdict.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from ds_checkfree.testing import procs
from ds_checkfree.testing.launch import REPO, job_env
from ds_checkfree.testing.records import last_step, read_metrics


class Job:
    """``cmd`` started now; ``output_dir``: the ``--output_dir`` it was given (its metrics.jsonl,
    and the key to its processes); ``rank_var``: the variable the launcher puts each rank's
    number in (Open MPI's by default; ``RANK`` under torchrun)."""

    def __init__(self, cmd: list[str], output_dir: str | os.PathLike, log_path: str | os.PathLike, *,
                 env: dict | None = None, cwd: str | os.PathLike = REPO, rank_var: str = procs.MPI_RANK):
        self.cmd, self.out, self.log_path, self.rank_var = cmd, Path(output_dir), Path(log_path), rank_var
        self._log = open(self.log_path, "w")
        self.started_at = time.time()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env or job_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        """The metrics written so far (none before the file exists)."""
        return read_metrics(self.out, missing_ok=True)

    def last_step(self) -> dict | None:
        return last_step(self.records())

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of this job's training processes."""
        return procs.rank_pids(self.out, self.rank_var)

    def wait_for_step(self, step: int, timeout: float, poll: float = 0.05) -> dict | None:
        """The latest step row once some step >= ``step`` is written; None if the job ended
        first; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                return None
            last = self.last_step()
            if last is not None and last["step"] >= step:
                return last
            if time.time() >= deadline:
                raise TimeoutError(f"step {step} not reached in {timeout:.0f} s")
            time.sleep(poll)

    def signal_rank(self, rank: int, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to ``rank``'s process; its pid. ``LookupError`` when no process holds it."""
        pids = self.rank_pids()
        if rank not in pids:
            raise LookupError(f"rank {rank} not found among {pids}")
        os.kill(pids[rank], sig)
        return pids[rank]

    def wait(self, timeout: float | None) -> int:
        """The launcher's exit status; ``subprocess.TimeoutExpired`` if it is still running."""
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc

    def stop(self, dump_stacks: bool = False) -> None:
        """End the job now: its process group, then anything else still running with its output
        directory in the command line (a process started outside the group). ``dump_stacks``:
        every such process writes its threads' stacks to its log first (a hang's evidence)."""
        if dump_stacks:
            procs.dump_stacks(procs.pids_mentioning(self.out))
        procs.kill_group(self.proc)
        procs.send(procs.pids_mentioning(self.out), signal.SIGKILL)
        self._log.close()
