"""How the elastic launch forms, interrupts and leaves one generation's data plane, per backend.

The membership side (``elastic``) is the same for every backend; what differs is how a member
blocked on a dead or stopped peer is woken, and how the old groups are left behind so that
the next generation can form:

* gloo (CPU): wake = interrupt every wait on the data plane (``plane_waits``: gloo leaves a
  send or receive already in flight stranded when its connection breaks, so the member must
  not be the one waiting on it) and shut down the sockets the data plane opened (peers and
  the store see a closed connection at once); leave = shut those sockets down (peers blocked
  on this member fail now), then ``destroy_process_group``, which does not wait on peers, or,
  when a wait was abandoned, forget the groups and drop them once gloo ended that wait (a
  gloo group's destructor joins the worker thread a stranded collective occupies).
* NCCL (CUDA): measured on an H200 (docs/gpu.md, "NCCL after a peer's death"): after a
  SIGKILL, torch's watchdog tears the survivors down unless told not to, and ``destroy_process_group`` (with or after
  ``abort``) hangs on the dead peer. So, torchft's way: communicators are non-blocking
  (``abort`` never waits for a peer; their own waits bounded by the data-plane timeout), the
  watchdog only reports errors, wake = ``abort`` every
  group, leave = abort + forget every group without shutting it down (``c10d_private``), the
  objects kept alive so no destructor waits either; the next generation forms under a fresh
  store prefix (``elastic``). Each generation's communicators stay allocated (GPU memory grows
  by one set per recovery): acceptable for the few recoveries of a job, stated in docs/gpu.md.
  The NCCL wake needs no waiter thread: an aborted communicator ends its kernels, so every
  wait on them (a stream sync, ``.item()``) returns, and ``check_not_aborted`` stops the step.

A recovery re-forms only what a member needs: each distinct set of members once
(``ds_private.one_group_per_member_set``; DeepSpeed's grid asks for every pipe twice), a group
only by its own members (torch forms a gloo group by a rendezvous of its members over the
store, without a barrier over the default group), and no start-up broadcast of replica 0's
weights into a rebuilt engine. The default group carries only DeepSpeed's point-to-point
between pipe neighbours (and, with one replica, the pipe's loss broadcast); formed eagerly it
would be a mesh that grows with the job (a connection to every other member, 0.19 s at 33
ranks), so gloo forms it lazily: a pair connects on its first use
(``GlooPlane.forming_default_group``; NCCL creates its communicators on first use anyway).
Issue #29 measured each phase against job size (``benchmarks/recovery_scaling.py``).

On gloo a recovery also keeps every group without the lost slot (``standby_groups``): not the
group the engine used, which a kill mid-step leaves mid-operation even where the lost slot is
not a member (the lost replica's pipe never reaches the step's data-parallel all-reduces, so
every other replica's member waits in one, and the wake strands it; its members' operation
counts then differ), but an idle copy of it, formed in the background 2-9 steps into each
generation (by slot). The groups that hold the lost slot (its pipe, its data-parallel column, its group
of one) are formed anew, by their members alone; a member outside them forms none. What each
backend allows, for the record:

* NCCL: one communicator can be aborted alone (``ncclCommAbort``; torch: the group's backend
  ``abort``), and since NCCL 2.27 shrunk without a full re-initialisation (``ncclCommShrink``,
  torch ``shrink_group``; it raised the peer's remote error in our one try on an H200);
  ``ncclCommRevoke`` (2.28.7) stops one communicator without ending it. A replacement still
  needs a new communicator for each group that holds its slot (no "grow"). Idle copies are not
  formed on NCCL (``keeps_standby_groups``): each would hold GPU memory and its set-up would
  contend with training, and this plane has not run on a GPU since it was written.
* gloo (torch 2.13): no shrink (``supports_shrinking`` is False), and ``abort``/``shutdown``
  do not cancel an operation in flight (measured), so a group once interrupted is not reused;
  a group is one rendezvous of its own members over a store prefix, so its idle copy can form
  among them alone, on a thread, outside torch's registry (``c10d_private.form_gloo_group``).
  ``TORCH_GLOO_LAZY_INIT=1`` for every group (connect each pair on first use) halved forming
  the groups at 4x4 but moved the connections into the redone step, and the recovery was no
  faster (``benchmarks/recovery_scaling`` notes): used for the default group only.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

from ds_checkfree.pipe.devices import data_plane_backend
from ds_checkfree.elastic.plane_sockets import shutdown_new_sockets, socket_inodes
from ds_checkfree.elastic.plane_waits import WAITS, InterruptibleWaits


#: torch's switch between a gloo group that connects every pair when it forms and one that
#: connects a pair on its first use
GLOO_LAZY_INIT = "TORCH_GLOO_LAZY_INIT"


class DataPlaneAborted(RuntimeError):
    """This generation's NCCL groups were aborted while the step ran: what it received may be
    incomplete, so the step must not reach the optimizer (it is redone after the recovery)."""


#: set (before the abort) when a round aborts this generation's NCCL groups, cleared when the
#: next generation forms. An aborted receive does not raise: its kernel just ends, and the CPU
#: finds out only from this flag (torchft checks its own the same way).
_aborted = threading.Event()


def check_not_aborted() -> None:
    """Raise ``DataPlaneAborted`` when the data plane was aborted. Call it after a host sync
    that follows the step's last receive (the engine does, before the optimizer step): a flag
    set before that sync returned covers every kernel the abort cut short."""
    if _aborted.is_set():
        raise DataPlaneAborted("the data plane was aborted during this step (a membership round opened): "
                               "not stepping on what it received")


class DataPlane:
    """One backend's way through a generation. ``prepare`` runs before ``init_process_group``,
    ``wake`` on the membership reader thread when a round opens, ``leave`` on the main thread
    after the engine was dropped."""
    backend = ""
    #: whether idle copies of a member's groups form while it trains, so that a recovery keeps
    #: those without a lost slot (``standby_groups``)
    keeps_standby_groups = False

    def prepare(self) -> None:
        pass

    def forming_default_group(self):
        """Context around ``init_process_group``: how the default group is formed."""
        return contextlib.nullcontext()

    def wake(self) -> None:
        pass

    def leave(self) -> None:
        pass


class GlooPlane(DataPlane):
    backend = "gloo"
    keeps_standby_groups = True

    def __init__(self, waits: InterruptibleWaits = WAITS):
        self.waits = waits
        self._before: set[str] | None = None  # socket inodes from before the data plane formed
        #: groups of generations left while a wait on them was stranded, until gloo ended it
        self.left_behind: list[list] = []
        self._left_lock = threading.Lock()

    def prepare(self) -> None:
        self.waits.install()
        self.waits.arm()
        self._before = set(socket_inodes().values())

    @contextlib.contextmanager
    def forming_default_group(self):
        """The default group connects each pair of members on the pair's first use
        (``TORCH_GLOO_LAZY_INIT`` for this group only: torch reads it when a gloo group is
        constructed). Eager, it is a mesh of N-1 connections per member, formed again at every
        recovery, although a member only talks over it to its pipe neighbours (DeepSpeed's
        point-to-point) and, with one replica, in the loss broadcast of its pipe. The other
        groups stay eager: connecting a data-parallel ring lazily moves the wait into the
        redone step and made recovery slower (``benchmarks/results/gloo_lazy_init_ab.csv``)."""
        before = os.environ.get(GLOO_LAZY_INIT)
        os.environ[GLOO_LAZY_INIT] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(GLOO_LAZY_INIT, None)
            else:
                os.environ[GLOO_LAZY_INIT] = before

    def wake(self) -> None:
        self.waits.interrupt()  # first: the member leaves its wait whatever gloo does with the op
        if self._before is not None:
            shutdown_new_sockets(self._before)

    def leave(self) -> None:
        import torch.distributed as tdist

        from ds_checkfree.elastic.c10d_private import forget_groups
        if self._before is not None:
            shutdown_new_sockets(self._before)
        self._before = None
        stranded = self.waits.retire()
        if not tdist.is_initialized():
            return
        if not stranded:
            try:
                tdist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a group already broken by the dead peer
                pass
            return
        groups: list = []
        forget_groups(groups)
        with self._left_lock:
            self.left_behind.append(groups)
        threading.Thread(target=self._drop_when_ended, args=(stranded, groups), daemon=True,
                         name="data-plane-reaper").start()

    def _drop_when_ended(self, stranded: list[threading.Thread], groups: list) -> None:
        """Once gloo ended every stranded wait (at its timeout at the latest), the old
        generation's groups go: their destructors no longer wait on anything."""
        for waiter in stranded:
            waiter.join()
        with self._left_lock:
            self.left_behind = [g for g in self.left_behind if g is not groups]
        groups.clear()  # the last references: the destructors run here


#: torch's NCCL settings the NCCL plane needs, and why; set for this process before the first
#: NCCL group exists (each group reads them when it is created)
NCCL_ENV = {
    # report a failed or timed-out operation instead of tearing the process down: the survivors
    # must live through a peer's death (the default, 3, kills them)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
    # non-blocking communicators: ``abort`` returns without waiting on the dead peer
    "TORCH_NCCL_USE_COMM_NONBLOCKING": "1",
    # the watchdog's own monitor would kill a process whose watchdog waits on a dead peer
    "TORCH_NCCL_ENABLE_MONITORING": "0",
}


class NcclPlane(DataPlane):
    backend = "nccl"

    def __init__(self, log=print, timeout_s: float = 60.0):
        self.log, self.timeout_s = log, timeout_s
        self.left_behind: list = []  # every former generation's groups, never destroyed

    def settings(self) -> dict[str, str]:
        """``NCCL_ENV`` plus the bound on a non-blocking communicator's own waits (init, abort;
        torch's default is 30 min): the data-plane timeout."""
        return dict(NCCL_ENV, TORCH_NCCL_NONBLOCKING_TIMEOUT=str(int(math.ceil(self.timeout_s))))

    def prepare(self) -> None:
        _aborted.clear()
        changed = {k: v for k, v in self.settings().items() if os.environ.get(k) != v}
        if changed:
            os.environ.update(changed)
            self.log(f"NCCL data plane: set {', '.join(f'{k}={v}' for k, v in changed.items())} "
                     "(a peer's death must not take this process down or block its teardown)")

    def wake(self) -> None:
        from ds_checkfree.elastic.c10d_private import abort_groups, registered_groups
        _aborted.set()  # first: a receive the abort cuts short must find it set
        for line in abort_groups(registered_groups()):
            self.log(f"NCCL data plane: abort while waking: {line}")

    def leave(self) -> None:
        import torch.distributed as tdist

        from ds_checkfree.elastic.c10d_private import abort_groups, forget_groups, registered_groups
        _aborted.set()
        if not tdist.is_initialized():
            return
        for line in abort_groups(registered_groups()):
            self.log(f"NCCL data plane: abort while leaving: {line}")
        forget_groups(self.left_behind)


def plane_for(accelerator: str, log=print, timeout_s: float = 60.0) -> DataPlane:
    """The data plane for DeepSpeed's accelerator name ("cpu", "cuda"); a backend without a
    teardown that survives a dead peer is refused with the fix."""
    backend = data_plane_backend(accelerator)
    if backend == "gloo":
        return GlooPlane()
    if backend == "nccl":
        return NcclPlane(log, timeout_s)
    raise NotImplementedError(
        f"the fault-tolerant launch (real process deaths) has no data plane for accelerator {accelerator!r} "
        f"({backend}): leaving a {backend} group behind without blocking on a dead peer is not implemented. "
        "Fix: run the elastic launch with DS_ACCELERATOR=cpu or cuda, or use logical failures "
        "(deepspeed/torchrun launch) on this accelerator.")
