"""Command lines and environments for real multi-process jobs of this repository.

Every launcher the tests and benchmarks use is built here, once: DeepSpeed's launcher,
torchrun, and ``mpirun`` (with ``--with-ft ulfm`` for the fault-tolerant launch), each a
prefix to which the caller appends a script and its arguments. The processes of one job are
found later through their ``--output_dir`` (see ``procs``), so every job gets its own.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

#: the checkout this package was installed from (editable install): launch/, ds_configs/, scripts/
REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
#: the venv's bin directory: deepspeed, torchrun and Open MPI's mpirun sit beside its python
BIN = Path(sys.executable).parent
#: what Open MPI sets in each rank's environment, which a process started by hand must not inherit
LAUNCHER_VARS = ("OMPI_", "PMIX_", "PRTE_")
#: what torchrun and DeepSpeed's launcher set, which a process started by hand must not inherit
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: the variables ``mpirun -x`` passes on to every rank
MPI_EXPORTS = ("OMP_NUM_THREADS", "DS_ACCELERATOR", "PYTHONPATH", "PYTHONUNBUFFERED")
LAUNCHERS = ("deepspeed", "torchrun", "mpirun")


def job_env(accelerator: str = "cpu", **extra: str) -> dict:
    """The environment of a job: one OpenMP thread per rank, unbuffered output, Open MPI allowed
    to run as root, and this checkout first on ``PYTHONPATH`` so every process imports the
    ``ds_checkfree`` under test even where the venv's editable install points at another one."""
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def standalone_env(accelerator: str = "cpu", **extra: str) -> dict:
    """``job_env`` for a process started by hand (a joiner, a member of a job with no launcher):
    no launcher's rank variables, which would make it think it is part of an MPI or torchrun world."""
    env = {k: v for k, v in job_env(accelerator, **extra).items()
           if not k.startswith(LAUNCHER_VARS) and k not in RENDEZVOUS_VARS}
    env.update({k: v for k, v in extra.items() if k in RENDEZVOUS_VARS})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    """The ``deepspeed`` command: the venv's, else the one on PATH, else its module."""
    local = BIN / "deepspeed"
    if local.exists():
        return [str(local)]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def mpirun_cmd(nproc: int, *, fault_tolerant: bool = False, placement: list[str] | tuple = ("--oversubscribe",),
               options: list[str] | tuple = ()) -> list[str]:
    """``mpirun [--with-ft ulfm] <placement> --map-by slot --bind-to none <options> -n N -x ... python``:
    ``fault_tolerant`` keeps mpirun from ending the job when a rank dies (ULFM); ``placement``: one
    host oversubscribed by default, or e.g. ``--hostfile`` and an ssh agent across hosts."""
    return [str(BIN / "mpirun"), *(["--with-ft", "ulfm"] if fault_tolerant else []), *placement,
            "--map-by", "slot", "--bind-to", "none", *options, "-n", str(nproc),
            *[x for var in MPI_EXPORTS for x in ("-x", var)], sys.executable]


def torchrun_cmd(nproc: int, accelerator: str = "cpu") -> list[str]:
    """``torchrun --standalone``, with torchrun's default of no restarts (a dead rank ends the job).
    On CUDA every rank goes through ``scripts/one_gpu_rank.sh``: all on GPU 0, each its own host to NCCL."""
    wrap = [str(REPO / "scripts" / "one_gpu_rank.sh")] if accelerator == "cuda" else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--no-python", *wrap, sys.executable]


def launcher_cmd(launcher: str, nproc: int, *, accelerator: str = "cpu", fault_tolerant: bool = False) -> list[str]:
    """The command in front of a script and its arguments, for ``nproc`` ranks under ``launcher``
    (deepspeed, torchrun or mpirun; ``fault_tolerant``: mpirun's ULFM launch)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if fault_tolerant and launcher != "mpirun":
        raise ValueError(f"the fault-tolerant launch is mpirun's (--with-ft ulfm), not {launcher}'s")
    if accelerator == "cuda" and launcher != "torchrun":
        raise ValueError("several ranks on one GPU need torchrun (scripts/one_gpu_rank.sh gives each its NCCL host)")
    if launcher == "deepspeed":
        return deepspeed_launcher() + ["--num_gpus", str(nproc), "--master_port", str(free_port())]
    if launcher == "torchrun":
        return torchrun_cmd(nproc, accelerator)
    return mpirun_cmd(nproc, fault_tolerant=fault_tolerant)


def train_args(config: str | os.PathLike, output_dir: str | os.PathLike, steps: int, *, model: str = "tiny",
               eval_every: int | None = 0, extra: list | tuple = ()) -> list[str]:
    """``launch/train.py`` and its arguments (``eval_every`` None: the script's default)."""
    args = [str(TRAIN), "--deepspeed_config", str(config), "--model", model, "--steps", str(steps)]
    if eval_every is not None:
        args += ["--eval_every", str(eval_every)]
    return args + ["--output_dir", str(output_dir), *map(str, extra)]
