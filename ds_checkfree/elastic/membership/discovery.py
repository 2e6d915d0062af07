"""Where the job's coordinator is, and the address this member advertises.

Three ways to find it: ``--coordinator`` / ``--join`` name it; every rank on one host (mpirun's
local size equals its world size): the first rank to claim a lock file starts it, with no MPI
call at all; across hosts: rank 0 starts it and the address travels over MPI once. Kept apart
from ``elastic`` (roles, rounds, the data plane) because it runs once, before membership.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from ds_checkfree.config.options import parse_address
from ds_checkfree.elastic.membership.client import CoordinatorLost


def locate(num_stages: int, spares: int, dp: int, cf, log_dir: str | None, coordinator: str | None,
           joining: bool) -> tuple[tuple[str, int], str]:
    """(the coordinator's (host, port), the address this member advertises)."""
    mpi_rank = os.environ.get("OMPI_COMM_WORLD_RANK")
    if coordinator is not None:
        address = parse_address(coordinator)
        return address, choose_interface(address[0])
    if joining or mpi_rank is None:
        raise ValueError("a joining process needs the job's coordinator address (--join HOST:PORT)")
    one_host = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == os.environ.get("OMPI_COMM_WORLD_SIZE")
    if one_host and os.environ.get("PMIX_NAMESPACE"):
        return coordinator_on_this_host(num_stages * dp + spares, cf, log_dir, dp), "127.0.0.1"
    return coordinator_over_mpi(num_stages * dp, spares, cf, log_dir, dp)


def choose_interface(coordinator_host: str) -> str:
    """This member's address: toward the coordinator's host (``netaddr``'s rules). When the
    coordinator is not on loopback the job may span hosts, so gloo is told the interface
    (its default, the hostname's address, is 127.0.1.1 on Debian)."""
    from ds_checkfree.elastic import addresses as netaddr
    try:
        coord_ip = socket.gethostbyname(coordinator_host)
    except OSError:
        coord_ip = coordinator_host
    multi_host = not netaddr.is_loopback(coord_ip)
    choice = netaddr.choose_here(os.environ, multi_host=multi_host, peer_addrs=[coord_ip])
    if multi_host and choice.ifname and not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = choice.ifname
    return choice.addr


def coordinator_on_this_host(expect: int, cf, log_dir: str | None, dp: int) -> tuple[str, int]:
    """No ``--coordinator``, every rank on one host: the first rank to claim the job's lock
    file (named after mpirun's job namespace) starts the coordinator, the others read its
    port from the announce file. No MPI call, so a rank that dies during start-up (even
    before ``MPI_Init``) cannot stall the others, and rank 0 is not special."""
    key = "".join(c if c.isalnum() else "_" for c in os.environ["PMIX_NAMESPACE"])
    folder = log_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    announce = os.path.join(folder, f"coordinator-{key}.json")
    try:
        os.close(os.open(announce + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        start_coordinator(expect, cf, folder, announce=announce, dp=dp)
    except FileExistsError:
        pass
    deadline = time.monotonic() + cf.startup_wait_s + 60
    while time.monotonic() < deadline:
        try:
            with open(announce, encoding="utf-8") as f:
                return ("127.0.0.1", json.load(f)["port"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise CoordinatorLost(f"no coordinator announced itself in {announce} (the process that claimed it may "
                          "have died); start it yourself (python -m ds_checkfree.elastic.membership.coordinator) and "
                          "pass --coordinator HOST:PORT")


def coordinator_over_mpi(slots: int, spares: int, cf, log_dir: str | None, dp: int):
    """No ``--coordinator``: rank 0 starts one (a process of its own, outliving rank 0) and
    every rank learns its address over MPI, the only MPI traffic of the job."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != slots + spares:
        raise ValueError(f"MPI world has {size} ranks but {slots} stage ranks + {spares} spares were "
                         f"configured; launch with -n {slots + spares}")
    try:
        hosts = comm.allgather(socket.gethostname())
        addrs = _advertised_addrs(comm, rank, hosts)
        port = None
        if rank == 0:
            port = start_coordinator(slots + spares, cf, log_dir, dp=dp)
        port = comm.bcast(port, root=0)
    except MPI.Exception as err:
        raise CoordinatorLost(f"a process died while the job was forming ({err.Get_error_string().strip()}); "
                              "start the coordinator yourself (python -m ds_checkfree.elastic.membership.coordinator) "
                              "and pass --coordinator HOST:PORT, so start-up needs no MPI collective") from None
    return (addrs[0], port), addrs[rank]


def _advertised_addrs(comm, rank: int, hosts: list[str]) -> list[str]:
    """Each rank's reachable address (``netaddr``'s rules; the route toward the other hosts'
    interface addresses counts). A failure on any rank raises on every rank alike, naming it."""
    from ds_checkfree.elastic import addresses as netaddr
    single_host = len(set(hosts)) == 1
    mine = [a for a in netaddr.interfaces().values() if not netaddr.is_loopback(a)]
    everyone = comm.allgather(mine)
    peers = [a for r, addrs in enumerate(everyone) if hosts[r] != hosts[rank] for a in addrs]
    try:
        choice = netaddr.choose_here(os.environ, multi_host=not single_host, peer_addrs=peers)
        result = (choice.addr, None)
    except netaddr.NoReachableAddress as err:
        choice, result = None, (None, str(err))
    results = comm.allgather(result)
    errors = [f"rank {r} on {hosts[r]}: {e}" for r, (_, e) in enumerate(results) if e]
    if errors:
        raise netaddr.NoReachableAddress("; ".join(errors))
    if not single_host:
        if choice.ifname and not os.environ.get("GLOO_SOCKET_IFNAME"):
            os.environ["GLOO_SOCKET_IFNAME"] = choice.ifname
        print(f"[rank {rank}] {hosts[rank]}: advertising {choice.addr} ({choice.how}), gloo on "
              f"{os.environ.get('GLOO_SOCKET_IFNAME', 'its default device')}", flush=True)
    return [a for a, _ in results]


def coordinator_command(expect: int, cf, dp: int) -> list[str]:
    """``python -m ds_checkfree.elastic.membership.coordinator`` with the job's shape and timings."""
    return [sys.executable, "-m", "ds_checkfree.elastic.membership.coordinator", "--expect", str(expect),
            "--num_stages", str(cf.num_stages), "--heartbeat_timeout_s", str(cf.heartbeat_timeout_s),
            "--heartbeat_interval_s", str(cf.heartbeat_interval_s), "--startup_wait_s", str(cf.startup_wait_s),
            "--join_wait_s", str(cf.join_wait_s), "--dp", str(dp)]


def spawn_coordinator(cmd: list[str], log_path: str, pass_fds: tuple = ()) -> subprocess.Popen:
    """Start a coordinator as a process of its own session (it outlives its starter), not an MPI
    process, its output in ``log_path``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PRTE_"))]:
        del env[key]  # not an MPI process
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds)


def start_coordinator(expect: int, cf, log_dir: str | None, timeout_s: float = 60.0,
                      announce: str | None = None, dp: int = 1) -> int:
    """Start ``membership.coordinator`` as a process of its own session (it outlives this
    one) and return its port."""
    log_dir = log_dir or tempfile.gettempdir()
    os.makedirs(log_dir, exist_ok=True)
    announce = announce or os.path.join(log_dir, f"coordinator-{os.getpid()}.json")
    log_path = announce[:-len(".json")] + ".log" if announce.endswith(".json") else announce + ".log"
    proc = spawn_coordinator(coordinator_command(expect, cf, dp) + ["--port", "0", "--announce", announce], log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(announce):
            with open(announce, encoding="utf-8") as f:
                port = json.load(f)["port"]
            print(f"[rank {os.environ.get('OMPI_COMM_WORLD_RANK', '?')}] coordinator started (pid {proc.pid}, "
                  f"port {port}, log {log_path}); "
                  f"join with --join <this host>:{port}", flush=True)
            return port
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise CoordinatorLost(f"the coordinator did not start (see {log_path})")
