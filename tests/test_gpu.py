"""The one-GPU check (scripts/gpu_check.sh). On a machine without a CUDA GPU the GPU test is
skipped with the reason; the script's own refusal without a GPU is checked everywhere, and its
CPU dry run (the same recipe on gloo, checking the script and table, not the GPU) is slow."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import ROOT, job_env

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(tmp_path, timeout, **env):
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, timeout=timeout, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=job_env(GPU_CHECK_OUT=str(tmp_path / "gpu_check"), **env))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU (torch.cuda.is_available() is False): the CUDA + NCCL path is not checked here; "
                           "run scripts/gpu_check.sh on a machine with one")
def test_gpu_check_passes_on_one_gpu(tmp_path):
    proc = _run(tmp_path, timeout=3600, GPU_CHECK_STEPS="20")
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-6000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 8 and all(line.rstrip().endswith("| ok |") for line in table[1:]), "\n".join(table)
    assert "all 8 runs passed" in proc.stdout


def test_gpu_check_says_so_when_no_gpu_is_visible(tmp_path):
    proc = _run(tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stdout
    assert "no CUDA GPU is visible" in proc.stdout and "nothing to check" in proc.stdout
    assert not (tmp_path / "gpu_check").exists()  # refused before any run


@pytest.mark.slow
def test_gpu_check_recipe_runs_on_cpu(tmp_path):
    """The same eight runs on CPU/gloo (about 4 min on 2 cores): the script, configs and table,
    and the real SIGKILL without MPI (``scripts/kill_check.py``) on gloo."""
    proc = _run(tmp_path, timeout=1800, GPU_CHECK_CPU="1", GPU_CHECK_STEPS="16")
    assert proc.returncode == 0, proc.stdout[-6000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 9 and all(line.rstrip().endswith("| ok |") for line in table[1:]), "\n".join(table)


def test_rank_wrapper_makes_each_rank_its_own_host_on_gpu_0():
    env = dict(job_env(), RANK="3", LOCAL_RANK="3", CUDA_VISIBLE_DEVICES="1,2")
    out = subprocess.run([str(ROOT / "scripts" / "one_gpu_rank.sh"), "env"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    seen = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert (seen["NCCL_HOSTID"], seen["LOCAL_RANK"], seen["CUDA_VISIBLE_DEVICES"], seen["NCCL_SOCKET_IFNAME"]) == \
        ("host3", "0", "0", "lo")
    env.pop("RANK")
    missing = subprocess.run([str(ROOT / "scripts" / "one_gpu_rank.sh"), "true"], capture_output=True, text=True,
                             env=env, timeout=30)
    assert missing.returncode != 0 and "torchrun sets RANK" in missing.stderr
