"""The harness the tests, benchmarks and scripts share to run real jobs of this repository.

- ``launch``: command lines (DeepSpeed's launcher, torchrun, the fault-tolerant ``mpirun``),
  ``launch/train.py``'s arguments, and the environment of a job or of a process started by hand;
- ``procs``: a job's processes through /proc (rank -> pid), signals, waiting for a pid to go;
- ``records``: a run's metrics.jsonl (``ds_checkfree.metrics.read_metrics``, one rule for a
  half-written last line), its steps and events, where a recovery's time went;
- ``job``: one job in the background (start, follow its steps, signal a rank, wait, stop);
- ``direct_job``: a job without a launcher (a coordinator and every member started by hand),
  where there is no MPI and for several ranks on one GPU.

It needs the checkout the package is installed from (editable: ``pip install -e .``), whose
``launch/train.py`` and ``ds_configs/`` it runs.
"""
from ds_checkfree.testing.job import Job
from ds_checkfree.testing.launch import (BIN, REPO, TRAIN, free_port, job_env, launcher_cmd, mpirun_cmd,
                                         standalone_env, torchrun_cmd, train_args)
from ds_checkfree.testing.procs import MPI_RANK, is_gone, pids_mentioning, rank_pids, wait_gone
from ds_checkfree.testing.records import (events_of, last_step, read_metrics, recovery_phases, split,
                                          steps_accounted, steps_of)

__all__ = ["BIN", "Job", "MPI_RANK", "REPO", "TRAIN", "events_of", "free_port", "is_gone", "job_env", "last_step",
           "launcher_cmd", "mpirun_cmd", "pids_mentioning", "rank_pids", "read_metrics", "recovery_phases", "split",
           "standalone_env", "steps_accounted", "steps_of", "torchrun_cmd", "train_args", "wait_gone"]
