"""Surviving a real process death: membership over MPI (ULFM) and a rebuilt data plane.

Launched as ``mpirun --with-ft ulfm -n S+N python launch/train.py ... --spares N``: ranks
0..S-1 run the pipeline stages, the N extra ranks wait idle as spares. The training data
plane is a torch.distributed gloo group of the S stage ranks only (DeepSpeed runs on it);
MPI carries control: heartbeats, the agreement on who is gone, and the new rendezvous.

When a stage's process dies, gloo errors reach its neighbours at once; each survivor tears
its process group down (closing its sockets, so ranks blocked on it fail too), revokes the
MPI control communicator (waking idle spares) and joins ``Shrink``, a fault-tolerant
consensus on the survivors. Every member then computes the same new role table (lowest
spare takes the lowest lost stage), a new gloo group is formed around a fresh TCPStore, and
the caller rebuilds the DeepSpeed engine from the survivors' in-memory state.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

_CTRL_TAG = 7101
_PORT_TAG = 7102


class NoSpareLeft(RuntimeError):
    """A stage was lost and no spare process can take its place."""

    def __init__(self, message: str, lost_stages: list[int], dead_ranks: list[int], survivors: list[int]):
        super().__init__(message)
        self.lost_stages, self.dead_ranks, self.survivors = lost_stages, dead_ranks, survivors


@dataclass
class Agreement:
    """What every survivor agreed on after a failure (identical on all members)."""
    dead_ranks: list[int]
    lost_stages: list[int]
    replacements: dict[int, int]  # stage -> world rank that takes it
    resume_step: int
    revoked_at: float
    agreed_at: float
    roles_before: dict = field(default_factory=dict)  # world rank -> stage (None: spare) before the failure


def _error_class(err) -> int:
    try:
        return err.Get_error_class()
    except Exception:  # pragma: no cover
        return -1


class ElasticWorld:
    """Roles (stage or spare) of every MPI rank, agreement after failures, data-plane rendezvous."""

    def __init__(self, num_stages: int, spares: int, dp_timeout_s: float = 60.0):
        from mpi4py import MPI
        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        if self.size != num_stages + spares:
            raise ValueError(f"MPI world has {self.size} ranks but {num_stages} stages + {spares} spares were "
                             f"configured; launch with -n {num_stages + spares}")
        self.num_stages = num_stages
        self.ctrl = self.world.Dup()
        self.ctrl.Set_errhandler(MPI.ERRORS_RETURN)
        self.dp_timeout_s = dp_timeout_s
        #: world rank -> stage id, or None for a spare
        self.roles: dict[int, int | None] = {r: (r if r < num_stages else None) for r in range(self.size)}
        #: world rank -> rank in the current control communicator (changes after each Shrink)
        self.ctrl_rank: dict[int, int] = {r: r for r in range(self.size)}
        hosts = self.ctrl.allgather(socket.gethostname())
        self.single_host = len(set(hosts)) == 1
        #: world rank -> the address its peers reach it at (data-plane rendezvous)
        self.addrs = self._advertised_addrs(hosts)

    def _advertised_addrs(self, hosts: list[str]) -> list[str]:
        """Each rank's reachable address (``netaddr``'s rules; the route toward the other hosts'
        interface addresses counts). A failure on any rank raises on every rank alike, naming it.
        Across hosts, gloo's own device follows the chosen interface unless GLOO_SOCKET_IFNAME is set
        (its default, the hostname's address, is 127.0.1.1 on Debian)."""
        from ds_checkfree import netaddr
        mine = [a for a in netaddr.interfaces().values() if not netaddr.is_loopback(a)]
        everyone = self.ctrl.allgather(mine)
        peers = [a for r, addrs in enumerate(everyone) if hosts[r] != hosts[self.rank] for a in addrs]
        try:
            choice = netaddr.choose_here(os.environ, multi_host=not self.single_host, peer_addrs=peers)
            result = (choice.addr, None)
        except netaddr.NoReachableAddress as err:
            choice, result = None, (None, str(err))
        results = self.ctrl.allgather(result)
        errors = [f"rank {r} on {hosts[r]}: {e}" for r, (_, e) in enumerate(results) if e]
        if errors:
            raise netaddr.NoReachableAddress("; ".join(errors))
        if not self.single_host:
            if choice.ifname and not os.environ.get("GLOO_SOCKET_IFNAME"):
                os.environ["GLOO_SOCKET_IFNAME"] = choice.ifname
            print(f"[rank {self.rank}] {hosts[self.rank]}: advertising {choice.addr} ({choice.how}), gloo on "
                  f"{os.environ.get('GLOO_SOCKET_IFNAME', 'its default device')}", flush=True)
        return [a for a, _ in results]

    # -- roles ---------------------------------------------------------------------------
    @property
    def stage(self) -> int | None:
        return self.roles.get(self.rank)

    def stage_rank(self, stage: int) -> int:
        return next(r for r, s in self.roles.items() if s == stage)

    def stage_ranks(self) -> list[int]:
        return sorted(r for r, s in self.roles.items() if s is not None)

    def spares(self) -> list[int]:
        return sorted(r for r, s in self.roles.items() if s is None)

    # -- data plane ----------------------------------------------------------------------
    def init_data_plane(self) -> None:
        """Form the gloo group of the stage ranks (data-plane rank = stage id)."""
        import torch.distributed as tdist
        backend = self.data_plane_backend()  # refuses an accelerator before anything is formed
        leader = self.stage_rank(0)
        if self.rank == leader:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            addr = self.addrs[self.rank]
            for r, st in self.roles.items():
                if st is not None and r != leader:
                    self.ctrl.send((addr, port), dest=self.ctrl_rank[r], tag=_PORT_TAG)
        else:
            addr, port = self.ctrl.recv(source=self.ctrl_rank[leader], tag=_PORT_TAG)
        os.environ.update({"RANK": str(self.stage), "WORLD_SIZE": str(self.num_stages), "MASTER_ADDR": addr,
                           "MASTER_PORT": str(port),
                           "LOCAL_RANK": os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")})
        # backstop: DeepSpeed's subgroups are created without a timeout (30 min by default);
        # make any op on them fail after the data-plane timeout instead
        from torch.distributed import distributed_c10d
        distributed_c10d.default_pg_timeout = timedelta(seconds=self.dp_timeout_s)
        store = tdist.TCPStore(addr, port, self.num_stages, is_master=self.rank == leader,
                               timeout=timedelta(seconds=self.dp_timeout_s))
        tdist.init_process_group(backend, store=store, rank=self.stage,
                                 world_size=self.num_stages, timeout=timedelta(seconds=self.dp_timeout_s))

    @staticmethod
    def data_plane_backend() -> str:
        """gloo on CPU. On an accelerator the backend would be NCCL (``comm_device``), but
        surviving a death there needs a teardown that never blocks on the dead peer (measured:
        ``destroy_process_group`` after NCCL's abort hangs for over 40 s; DESIGN.md section 6),
        which is not implemented: refused before any group is formed."""
        from deepspeed.accelerator import get_accelerator

        from .comm_device import data_plane_backend
        accel = get_accelerator().device_name()
        backend = data_plane_backend(accel)
        if backend != "gloo":
            raise NotImplementedError(
                f"the fault-tolerant launch (real process deaths) runs its data plane on gloo only; on "
                f"accelerator {accel!r} it would need {backend}, whose rebuild after a death is not implemented "
                "in this release (NCCL's destroy_process_group hangs on a dead peer). Fix: run the elastic launch "
                "with DS_ACCELERATOR=cpu, or use logical failures (deepspeed/torchrun launch) on the GPU.")
        return backend

    @staticmethod
    def tear_down_data_plane() -> None:
        """Close this rank's gloo connections so peers blocked on it fail now, not at the timeout
        (the caller must have dropped its engine, which holds the subgroups)."""
        import torch.distributed as tdist
        if tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except Exception:
                pass

    # -- agreement -----------------------------------------------------------------------
    def agree(self, steps_done: int) -> Agreement:
        """Revoke + Shrink: all survivors (stages and spares) agree on who is gone.

        ``steps_done`` is this rank's count of completed steps (ignored for spares). Raises
        ``NoSpareLeft`` on every survivor alike when a lost stage has no replacement.
        """
        MPI = self.MPI
        revoked_at = time.time()
        try:
            self.ctrl.Revoke()
        except MPI.Exception:
            pass
        new = self.ctrl.Shrink()
        new.Set_errhandler(MPI.ERRORS_RETURN)
        members = MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), self.world.Get_group())
        done = new.allgather(steps_done if self.stage is not None else None)
        agreed_at = time.time()
        self.ctrl = new
        self.ctrl_rank = {int(w): i for i, w in enumerate(members)}
        alive = set(members)
        roles_before = dict(self.roles)
        dead = sorted(r for r in self.roles if r not in alive)
        lost = sorted(self.roles[r] for r in dead if self.roles[r] is not None)
        for r in dead:
            del self.roles[r]
        spares = self.spares()
        if len(spares) < len(lost):
            raise NoSpareLeft(f"stage(s) {lost} lost (MPI rank(s) {dead}) and only {len(spares)} spare(s) left: "
                              "no process can take their place. Launch with more spares (--spares) or restart "
                              "from a checkpoint.", lost, dead, sorted(alive))
        replacements = {}
        for stage, spare in zip(lost, spares):
            self.roles[spare] = stage
            replacements[stage] = spare
        stage_done = [d for d in done if d is not None]
        # normally all survivors stopped in the same step; if the failure split the final
        # collective, the ones that finished it keep their update and the others skip it
        resume = (max(stage_done) if stage_done else 0) + 1
        return Agreement(dead, lost, replacements, resume, revoked_at, agreed_at, roles_before=roles_before)

    def wait_as_spare(self):
        """Block until this spare is given a stage (returns the Agreement) or training ends (None)."""
        MPI = self.MPI
        while True:
            try:
                msg = self.ctrl.recv(source=MPI.ANY_SOURCE, tag=_CTRL_TAG)
                if msg == "done":
                    return None
            except MPI.Exception as err:
                if _error_class(err) == MPI.ERR_REVOKED:
                    agreement = self.agree(steps_done=-1)
                    if self.stage is not None:
                        return agreement
                else:  # a peer died (maybe another spare): acknowledge and keep waiting
                    self.ctrl.Ack_failed()

    def release_spares(self) -> None:
        """End of training: tell the idle spares to exit (called by the stage-0 rank)."""
        for r in self.spares():
            try:
                self.ctrl.send("done", dest=self.ctrl_rank[r], tag=_CTRL_TAG)
            except self.MPI.Exception:
                pass  # a dead spare needs no goodbye
