"""A preemption notice turned into an exact hand-off instead of a death (elastic launch).

Spot and preemptible VMs send SIGTERM some time before they take a node (GCP 30 s, AWS two
minutes). Left alone, SIGTERM ends the process at once, like SIGKILL, and the survivors
rebuild its stage by the CheckFree rules: an approximation. With a notice there is time to do
better: the process finishes the step it is in, publishes its whole stage (``training_state``:
weights, fp32 masters, optimizer state, recovery state) in the coordinator's store under its
slot and the step it was taken after, and exits. The coordinator sees its connection close and
opens an ordinary round; every member then finds the hand-off under the lost slot and the step
the job resumes after, the same answer on all of them (it was written before the exit that
started the round), and the member that takes the slot loads it: method ``handoff``, exact, no
learning-rate change. The process then exits with status 0 (its work is saved elsewhere). A
second SIGTERM ends it at once by SIGTERM's default action, no step boundary within ``grace_s``
by SIGKILL (the survivors then use the rules, as for any death).

The hand-off travels through the coordinator's TCP store: fine for stages of up to a few GB
(one message), not a bulk-transfer path.
"""
from __future__ import annotations

import io
import os
import signal
import threading
import time

#: exit status of a process that handed its stage off: its work is done and saved elsewhere (a
#: launcher that counts non-zero exits as failures, such as mpirun, then still ends the job with 0)
EXIT_HANDED_OFF = 0


def die_by_sigterm() -> None:
    """(main thread) End now as SIGTERM would have without a handler: no hand-off (a spare has
    nothing to hand off; a second SIGTERM means now)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)  # not reached: the default action ends the process


def handoff_key(slot: int, after_step: int) -> str:
    """Where the stage of ``slot`` as it was after ``after_step`` is published: keyed by the
    step, so a later death of the same slot never finds an old hand-off."""
    return f"handoff/slot{int(slot)}/after{int(after_step)}"


def publish(store, slot: int, after_step: int, state: dict) -> int:
    """Put ``state`` (``engine.training_state()``) in ``store``; returns its size in bytes."""
    import torch
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    store.set(handoff_key(slot, after_step), data)
    return len(data)


def available(store, slot: int, after_step: int) -> bool:
    return bool(store.check([handoff_key(slot, after_step)]))


def take(store, slot: int, after_step: int, map_location=None) -> tuple[dict, int]:
    """The published state (tensors on ``map_location``) and its size in bytes."""
    import torch
    data = store.get(handoff_key(slot, after_step))
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False), len(data)


class PreemptionNotice:
    """SIGTERM -> ``requested`` (read by the training loop at step boundaries). ``holds_stage()``
    says whether there is anything to hand off: a spare has none and exits at once."""

    def __init__(self, grace_s: float, holds_stage, log=print):
        if grace_s <= 0:
            raise ValueError(f"grace_s must be > 0, got {grace_s!r}")
        self.grace_s = float(grace_s)
        self.holds_stage = holds_stage
        self.log = log
        self.requested = threading.Event()
        self.received_at: float | None = None

    def install(self) -> "PreemptionNotice":
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:  # runs in the main thread, between bytecodes
        if self.requested.is_set() or not self.holds_stage():
            die_by_sigterm()
        self.received_at = time.time()
        self.requested.set()
        self.log(f"SIGTERM: handing this stage off after the current step (at most {self.grace_s:g} s)")
        timer = threading.Timer(self.grace_s, self._give_up)
        timer.daemon = True
        timer.start()

    def _give_up(self) -> None:
        """(timer thread) Only the main thread may reset a signal's action, and it may be stuck in
        a collective: end by SIGKILL, which needs neither."""
        self.log(f"no step boundary within {self.grace_s:g} s of SIGTERM: exiting without a hand-off")
        os.kill(os.getpid(), signal.SIGKILL)
