"""Idle copies of a member's groups, formed while it trains, so that a recovery re-forms only
the groups that hold a lost slot (issue #29, "rebuild only what changed"; gloo).

A recovery cannot keep the groups the engine used: a kill mid-step leaves groups without the
lost slot mid-operation too (the lost replica's pipe never reaches the step's data-parallel
all-reduces, so every other replica waits in one, and the wake strands it), and a group so
interrupted has members whose operation sequences differ. A copy that was never used has no
such history. So, two steps into each generation (the default group's lazy pairs, between pipe
neighbours, have connected by then; and spread over 8 steps by slot, like the next store
client, ``member_plane.form_standby_groups``), each member forms in a background thread a second gloo
group for every set of members it shares a group with (its pipe, its data-parallel column,
its neighbour pairs, its group of one), outside torch's registry, through its own store
client, in one global order (sorted member sets: the smallest set nobody finished has all its
members at it, so no two members wait on each other). The sockets they open are exempted from
the generation's wake, and the member then writes a ready mark to the coordinator's store,
both under the member's lock and only while no round for a newer generation was announced.

At the next generation's engine build, a member set is served by its idle copy instead of a
new group exactly when ``promotable`` says so, and every member of the set says the same:
the copy is from the generation just before, each of its slots is held by the same member as
when it formed, and every one of those members wrote its ready mark. A mark is written before
its writer learns of the round (under the lock that records the round) and the marks are read
after the plan, which needs every member's check-in, so each member reads the same marks. A
promoted copy is registered with torch (``c10d_private.register_group``) and its sockets join
the new generation's wake. The groups that hold the lost slot are formed as before, each by
its own members alone (``use_local_synchronization``: a member that keeps a group skips its
``new_group`` call, and torch's counted group names would drift apart otherwise).

NCCL: not done here (``DataPlane.keeps_standby_groups``): an idle NCCL communicator costs GPU
memory and its set-up contends with training, and it has never run on a GPU.
"""
from __future__ import annotations

import ast
import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from ds_checkfree.elastic.plane_sockets import socket_inodes

#: a generation's copies form once this many of its steps completed (the default group's pairs
#: connect on their first use, in the first step: sockets opened meanwhile are the plane's)
STEPS_BEFORE_FORMING = 2


#: the line every member logs after a recovery's engine rebuild (``rebuild_line``)
_REBUILD_LINE = (r"generation (\d+) \(slot (\d+)\): (\d+) groups kept from before, (\d+) formed anew in "
                 r"([\d.]+) s: (\[[\d, \[\]]*\])")


def rebuild_line(generation: int, slot: int, kept: int, formed: list, seconds: float) -> str:
    """What a member kept and formed in a recovery's engine rebuild, in one line (read back by
    ``read_rebuild_lines``: the benchmarks and tests take every member's from the logs)."""
    return (f"generation {generation} (slot {slot}): {kept} groups kept from before, {len(formed)} formed anew "
            f"in {seconds:.4f} s: {[list(m) for m in formed]}")


def read_rebuild_lines(text: str) -> list[dict]:
    """Every ``rebuild_line`` in ``text``: generation, slot, kept, formed (member sets), seconds."""
    return [{"generation": int(g), "slot": int(slot), "kept": int(kept),
             "formed": [tuple(m) for m in ast.literal_eval(sets)], "seconds": float(sec)}
            for g, slot, kept, _, sec, sets in re.findall(_REBUILD_LINE, text)]


def set_key(members) -> str:
    """A member set's name in store keys and group names."""
    return "-".join(str(m) for m in members)


def ready_key(generation: int, slot: int) -> str:
    """Written by the member holding ``slot`` once all its copies of ``generation`` formed."""
    return f"standby/gen{generation}/ready/{slot}"


def promotable(members, formed_in: int, generation: int, holders_then: dict[int, int],
               holders_now: dict[int, int], ready: set[int]) -> bool:
    """Whether the copy of ``members`` (slots) formed in generation ``formed_in`` serves
    generation ``generation``: the very next one, every slot held by the member that held it
    then, every slot's ready mark written. The same on every member of the set."""
    if generation != formed_in + 1:
        return False
    return all(holders_then.get(s) is not None and holders_then.get(s) == holders_now.get(s) and s in ready
               for s in members)


@dataclass
class Copies:
    """One generation's idle copies at this member."""
    generation: int
    slot: int
    holders: dict[int, int]               # slot -> member id when they formed
    made: dict[tuple, object] = field(default_factory=dict)  # member set -> its idle ProcessGroup
    stores: dict[tuple, object] = field(default_factory=dict)  # member set -> its PrefixStore
    inodes: set[str] = field(default_factory=set)
    ready: bool = False


class StandbyGroups:
    """The background forming of one generation's copies, and their hand-over."""

    def __init__(self, open_client, keep, timeout_s: float):
        """``open_client(host, port)``: a store client. ``keep(copies, client)``: (the forming
        thread) exempt the copies' sockets from the generation's wake and write the ready mark,
        atomically with a round's wake; False when ``copies.generation`` is no longer the
        generation formed or a newer round was announced (the copies are then dropped)."""
        self._open, self._keep, self.timeout_s = open_client, keep, timeout_s
        self._lock = threading.Lock()
        self._copies: Copies | None = None
        self._thread: threading.Thread | None = None
        self._started_for: int | None = None

    def prepare(self, where: tuple[str, int], generation: int, slot: int, holders: dict[int, int],
                member_sets) -> threading.Thread | None:
        """Start forming ``generation``'s copies of ``member_sets`` (those holding ``slot``) in
        the background, once per generation; returns the thread, or None when none started."""
        with self._lock:  # called between every two steps: the common answer first, at no cost
            if self._started_for == generation:
                return None
            self._started_for = generation
            self._copies = None  # the previous generation's: past their one use
        sets = sorted({tuple(m) for m in member_sets if slot in m})
        if not sets:
            return None
        copies = Copies(generation, slot, dict(holders))
        thread = threading.Thread(target=self._form, args=(where, copies, sets), daemon=True,
                                  name="standby-groups")
        self._thread = thread
        thread.start()
        return thread

    def _form(self, where: tuple[str, int], copies: Copies, sets: list[tuple]) -> None:
        import torch.distributed as tdist

        from ds_checkfree.elastic.c10d_private import form_gloo_group
        try:
            before = set(socket_inodes().values())
            client = self._open(*where)
            for members in sets:
                store = tdist.PrefixStore(f"standby/gen{copies.generation}/{set_key(members)}/", client)
                name = f"standby{copies.generation}-{set_key(members)}"
                copies.made[members] = form_gloo_group(store, members.index(copies.slot), len(members),
                                                         timedelta(seconds=self.timeout_s), name)
                copies.stores[members] = store
            copies.inodes = set(socket_inodes().values()) - before
            if self._keep(copies, client):
                copies.ready = True
                with self._lock:
                    if self._started_for == copies.generation:
                        self._copies = copies
        except Exception:  # noqa: BLE001 - an optimisation: without copies every group forms anew
            pass

    def take(self, members: tuple, generation: int, holders_now: dict[int, int], ready_slots) -> tuple | None:
        """The idle copy of ``members`` for ``generation`` and its store, when ``promotable``
        (``ready_slots(generation, slots)``: the slots among them whose ready mark for the
        copies' generation is written); None
        otherwise. A copy is handed over once."""
        with self._lock:
            copies = self._copies
        if copies is None or members not in copies.made:
            return None
        if generation != copies.generation + 1:
            return None
        if not promotable(members, copies.generation, generation, copies.holders, holders_now,
                          set(ready_slots(copies.generation, list(members)))):
            return None
        return copies.made.pop(members), copies.stores.pop(members), copies.inodes

    def drop(self) -> None:
        """The copies left after a build: no later generation can use them."""
        with self._lock:
            self._copies = None

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for a forming in progress: a thread inside torch's connect when the
        interpreter finalises ends the process with ``terminate called``."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout_s)
        self.drop()
