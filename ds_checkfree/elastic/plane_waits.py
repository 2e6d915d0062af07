"""Waits on the gloo data plane that a membership round can cut short.

Why shutting down the plane's sockets is not enough (gloo as bundled with torch 2.13,
``gloo/transport/tcp/pair.cc``): an unbound-buffer send becomes a write op in the pair's
transmit queue once the receiver has said it is ready, and a receive becomes the pair's
current read op once its first bytes arrived. When the connection breaks (our shutdown, the
peer's close, a reset), ``Pair::signalException`` wakes the buffers of *pending* sends and
receives but not the unbound buffer of an op already in flight (it signals only the bound
buffers of the transmit queue, and never the current read op); a write that fails with EPIPE
or ECONNRESET is dropped silently. The thread waiting on that op (``UnboundBuffer::waitSend``
/ ``waitRecv``, in ``Work.wait`` or on a process group's worker thread inside a collective)
then sleeps until the data-plane timeout: ``unbound_buffer.cc:129] Timed out waiting 30000ms
for send operation to complete``. Nothing reachable from Python ends that wait early (the
group's ``abort``/``shutdown`` do not; torch binds no per-work abort).

So the caller never sits in that wait itself: while ``install``ed, ``Work.wait`` hands the
C++ wait to a waiter thread and the caller waits on an event that ``interrupt`` (a round
opening) also sets; the caller then raises ``WaitInterrupted`` at once and the waiter is
left behind, to end with gloo's timeout. Until ``arm`` (the next generation), every wait
raises at once. The abandoned waits are ``retire``d with their generation: its groups must
stay alive until they end (``GlooPlane.leave``), since a gloo group's destructor joins the
worker thread a stranded collective still occupies. CPU tensors only: a CUDA ``Work.wait``
acts on the calling thread's stream, so the NCCL plane does not install this (it aborts its
communicators instead, which ends their kernels and waits).
"""
from __future__ import annotations

import queue
import threading


class WaitInterrupted(RuntimeError):
    """A membership round opened while this member waited on (or was about to wait on) the
    data plane: the step cannot complete on this generation (a data-plane error)."""


class _Call:
    """One ``Work.wait`` handed to a waiter thread."""
    __slots__ = ("args", "done", "error", "finished", "result", "work")

    def __init__(self, work, args):
        self.work, self.args = work, args
        self.done = threading.Event()
        self.finished, self.result, self.error = False, None, None

    def run(self, original) -> None:
        try:
            self.result = original(self.work, *self.args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self.error = err
        self.finished = True
        self.done.set()


def _serve(jobs: queue.SimpleQueue, original) -> None:
    """A waiter thread: run each call; ``None`` (after an interrupt) ends it."""
    while (call := jobs.get()) is not None:
        call.run(original)


class InterruptibleWaits:
    """Process-wide: ``torch.distributed.Work.wait`` while installed (one instance per process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._original = None
        self._interrupted = False
        self._pending: set[_Call] = set()
        self._jobs: queue.SimpleQueue | None = None   # the current waiter thread's queue
        self._waiter: threading.Thread | None = None
        self._retired: list[threading.Thread] = []    # waiters left blocked by an interrupt

    # -- set-up --------------------------------------------------------------------------
    def install(self) -> None:
        """Route every ``Work.wait`` of this process through a waiter thread (idempotent)."""
        from ds_checkfree.elastic.c10d_private import work_class
        with self._lock:
            if self._original is not None:
                return
            cls = work_class()
            self._original = cls.wait
            waits = self

            def wait(work, *args):
                return waits._wait(work, args)
            wait.__doc__ = self._original.__doc__
            cls.wait = wait

    def uninstall(self) -> None:
        from ds_checkfree.elastic.c10d_private import work_class
        with self._lock:
            if self._original is not None:
                work_class().wait, self._original = self._original, None

    @property
    def installed(self) -> bool:
        return self._original is not None

    # -- generations ---------------------------------------------------------------------
    def arm(self) -> None:
        """A new generation forms: waits work again."""
        with self._lock:
            self._interrupted = False

    def interrupt(self) -> int:
        """(any thread) Every wait in progress raises ``WaitInterrupted`` now, and so does every
        later one until ``arm``; returns how many were in progress."""
        with self._lock:
            self._interrupted = True
            pending = [c for c in self._pending if not c.finished]
            if pending and self._jobs is not None:  # its waiter is stuck in one of them: retire it
                self._jobs.put(None)
                self._retired.append(self._waiter)
                self._jobs = self._waiter = None
            for call in self._pending:
                call.done.set()
            return len(pending)

    def retire(self) -> list[threading.Thread]:
        """The waiter threads an interrupt left blocked (they end when gloo gives up on their
        op); handed to the caller, which keeps their generation's groups alive until then."""
        with self._lock:
            retired, self._retired = [t for t in self._retired if t.is_alive()], []
            return retired

    # -- the wait ------------------------------------------------------------------------
    def _wait(self, work, args):
        with self._lock:
            if self._interrupted:
                raise WaitInterrupted("a membership round opened: this generation's data plane is being left")
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                self._waiter = threading.Thread(target=_serve, args=(self._jobs, self._original), daemon=True,
                                                name="data-plane-waiter")
                self._waiter.start()
            call = _Call(work, args)
            self._pending.add(call)
            self._jobs.put(call)
        try:
            call.done.wait()
        finally:
            with self._lock:
                self._pending.discard(call)
        if not call.finished:
            raise WaitInterrupted("a membership round opened while this member waited on the data plane "
                                  "(the wait is abandoned; gloo ends it at its timeout)")
        if call.error is not None:
            raise call.error
        return call.result


#: the one instance of this process
WAITS = InterruptibleWaits()
