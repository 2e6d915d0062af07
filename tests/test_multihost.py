"""Two hosts on one machine (network namespaces, see multihost.py): the main job through
DeepSpeed's launcher, and the elastic job under ``mpirun --with-ft ulfm``, across hosts.

Launchers run on hostA; ranks fill hostA's slots first (``--map-by slot``). Each test checks
where the ranks really ran (the hostname each process sees), so none can pass on one host.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from conftest import write_config, BIN, ROOT, events_of, job_env, read_metrics, steps_of
from ds_checkfree.testing import mpirun_cmd
from multihost import HOSTS, TwoHosts, unavailable_reason
from test_elastic import ElasticJob, _check_survived, exit_pids

_reason: list = []


@pytest.fixture
def two_hosts(tmp_path):
    """Factory: ``two_hosts(ifname=..., debian_hosts=..., slots=...)`` builds a bed; all are torn
    down after the test, whatever happened."""
    if not _reason:
        _reason.append(unavailable_reason())
    if _reason[0]:
        pytest.skip(_reason[0])
    beds = []

    def make(**kw) -> TwoHosts:
        bed = TwoHosts(tmp_path / f"bed{len(beds)}", **kw)
        beds.append(bed)
        return bed.up()
    yield make
    for bed in beds:
        bed.down()


def env() -> dict:
    return job_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def elastic_launcher(bed: TwoHosts, nproc: int, *mpirun_opts: str) -> list[str]:
    """The README's cluster command for the elastic job, run on hostA."""
    return bed.on("hostA", mpirun_cmd(nproc, fault_tolerant=True, options=mpirun_opts, placement=[
        "--prtemca", "plm_ssh_agent", str(bed.agent), "--hostfile", str(bed.hostfile)]))


CONFIG = ROOT / "ds_configs" / "checkfree.json"  # the shipped one: the README's commands are these


def placement(job: ElasticJob, bed: TwoHosts) -> dict[int, str]:
    """MPI rank -> the host it runs on."""
    return {r: bed.hostname_of(pid) for r, pid in sorted(job.rank_pids().items())}


def advertised(log: str) -> dict[int, tuple[str, str, str]]:
    """rank -> (host, address, rule) from the line each rank prints at start-up."""
    return {int(r): (h, a, how) for r, h, a, how in
            re.findall(r"\[rank (\d+)\] (\S+): advertising (\S+) \((.*?)\), gloo on", log)}


def kill_one(job: ElasticJob, bed: TwoHosts, victim: int, steps: int, seed: int):
    """Wait for a random step, check the layout (hostA: ranks 0-2, hostB: 3-4), SIGKILL ``victim``."""
    job.wait_for_step(random.Random(seed).randint(6, 12), timeout=150)
    before = job.rank_pids()
    assert placement(job, bed) == {0: "hostA", 1: "hostA", 2: "hostA", 3: "hostB", 4: "hostB"}
    killed = job.kill(victim)
    killed_at = time.time()
    done = max(r["step"] for r in steps_of(read_metrics(job.out)))
    assert done < steps, f"the kill came too late (step {done} of {steps}): the test proves nothing"
    return before, killed, killed_at, job.wait()


def test_deepspeed_launcher_across_two_hosts_recovers_a_logical_failure(two_hosts, tmp_path):
    """``deepspeed --hostfile --launcher openmpi``, interface eth0 (DeepSpeed's default
    ``btl_tcp_if_include``), 2 stages per host, stage 2 (on hostB) wiped at step 5. Debian-style
    hosts files: gloo's default device would be 127.0.1.1, so the env file names the interface
    (the README's advice for the main job, whose rendezvous is DeepSpeed's)."""
    bed = two_hosts(slots={"hostA": 2, "hostB": 2}, debian_hosts=True)
    ds_env = tmp_path / "ds_env"
    ds_env.write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME=eth0\n")
    launcher = bed.on("hostA", [
        str(BIN / "deepspeed"), "--hostfile", str(bed.hostfile), "--launcher", "openmpi", "--no_ssh_check",
        "--master_addr", HOSTS["hostA"],
        "--launcher_args", f"--prtemca plm_ssh_agent {bed.agent} --map-by slot --bind-to none"])
    job = ElasticJob(tmp_path, 4, CONFIG, 14, "--fail_at", "2:5",
                     launcher=launcher, env={**env(), "DS_ENV_FILE": str(ds_env)})
    job.wait_for_step(2, timeout=150)
    assert placement(job, bed) == {0: "hostA", 1: "hostA", 2: "hostB", 3: "hostB"}
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-6000:]
    assert "btl_tcp_if_include eth0" in log  # DeepSpeed's default was in force, and right here
    records = read_metrics(job.out)
    assert sorted({r["step"] for r in steps_of(records)}) == list(range(1, 15))
    (failure,) = events_of(records, "failure")
    assert (failure["stage"], failure["step"]) == (2, 5)
    (recovery,) = events_of(records, "recovery")
    assert recovery["stage"] == 2 and recovery["method"] == "weighted_average" and recovery["sources"] == [1, 3]


def test_elastic_stage_killed_on_hostA_replaced_by_the_spare_on_hostB_with_debian_hosts_files(two_hosts, tmp_path):
    """Each host's own name resolves to 127.0.1.1 (Debian's default /etc/hosts) and no interface
    option is given: the data-plane address comes from the route toward the other host and gloo
    follows that interface. Stage 2's process (hostA) is SIGKILLed; the spare on hostB takes over."""
    bed = two_hosts(debian_hosts=True)
    resolved = subprocess.run(bed.on("hostB", ["getent", "hosts", "hostB"]), capture_output=True, text=True)
    assert resolved.stdout.split()[0] == "127.0.1.1"  # the trap is really set
    job = ElasticJob(tmp_path, 5, CONFIG, 30, "--spares", "1", launcher=elastic_launcher(bed, 5), env=env())
    before, killed, killed_at, rc = kill_one(job, bed, victim=2, steps=30, seed=11)
    _check_survived(job, rc, before, killed, killed_at, victim_stage=2, steps=30, method="weighted_average")
    assert "spare: taking the place of stage 2" in job.log()
    assert advertised(job.log()) == {r: (h, HOSTS[h], "route to a peer host") for r, h in
                                     [(0, "hostA"), (1, "hostA"), (2, "hostA"), (3, "hostB"), (4, "hostB")]}
    assert "gloo on eth0" in job.log()


def test_losing_a_whole_host_stops_cleanly_naming_the_lost_stage(two_hosts, tmp_path):
    """hostB runs stage 3 and the only spare: when every rank on hostB dies, no process can take
    stage 3 (and the rules cannot rebuild a last stage anyway), so the survivors stop with exit 3.
    The interface is ``lan0`` (not eth0), named to MPI and to the data plane as the README says."""
    bed = two_hosts(ifname="lan0")
    launcher = elastic_launcher(bed, 5, "--mca", "btl_tcp_if_include", "lan0", "-x", "CHECKFREE_SOCKET_IFNAME=lan0")
    cfg = write_config(tmp_path / "ds.json", join_wait_s=3.0)  # no joiner will come: stop soon
    job = ElasticJob(tmp_path, 5, cfg, 30, "--spares", "1", launcher=launcher, env=env())
    job.wait_for_step(8, timeout=150)
    pids = job.rank_pids()
    on_b = sorted(r for r, h in placement(job, bed).items() if h == "hostB")
    assert on_b == [3, 4]
    for r in reversed(on_b):  # the spare first, so no agreement can see it alive
        os.kill(pids[r], signal.SIGKILL)
    rc = job.wait()
    log = job.log()
    fatal = re.findall(r"\[member (\d+)\] fatal: (.*)", log)
    assert sorted(int(r) for r, _ in fatal) == [0, 1, 2], log[-6000:]
    assert all(msg.startswith("the job stops: stage(s) [3] lost and no spare or joining process took them")
               for _, msg in fatal)
    assert rc == 3, log[-6000:]
    assert "Traceback" not in log
    assert exit_pids(log) == {r: p for r, p in pids.items() if r < 3}
    # the metrics writer (stage 3) died with its host: the lowest survivor writes why the job ended
    (event,) = events_of(read_metrics(job.out), "unrecoverable")
    assert event["stages"] == [3] and event["dead_ranks"] == [3, 4] and "no spare or joining" in event["reason"]
    assert advertised(log) == {r: (h, HOSTS[h], "CHECKFREE_SOCKET_IFNAME=lan0") for r, h in
                               [(0, "hostA"), (1, "hostA"), (2, "hostA"), (3, "hostB"), (4, "hostB")]}
    assert "gloo on lan0" in log
