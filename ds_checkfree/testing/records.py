"""What a run's metrics.jsonl says: its steps, its events, and where a recovery's time went.

The records come from ``ds_checkfree.metrics.read_metrics`` (re-exported here): a step row has
a ``loss`` and no ``event``, a validation row a ``val_loss``, an event an ``event`` name.
"""
from __future__ import annotations

from ds_checkfree.metrics import read_metrics  # the one reader, re-exported

__all__ = ["events_of", "last_step", "read_metrics", "recovery_phases", "split", "steps_accounted", "steps_of"]


def steps_of(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r and "event" not in r]


def events_of(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


def split(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(step records, validation records, events), each in file order."""
    vals = [r for r in records if "event" not in r and "val_loss" in r]
    return steps_of(records), vals, [r for r in records if "event" in r]


def last_step(records: list[dict]) -> dict | None:
    """The step row with the highest step number, None before step 1."""
    steps = steps_of(records)
    return max(steps, key=lambda s: s["step"]) if steps else None


def steps_accounted(records: list[dict]) -> list[int]:
    """Steps with a metrics row, plus those the writer said were completed on the other stages
    while its own step broke (a peer died during the step's final loss exchange: the job goes
    on after them and their rows are lost, ``steps_completed_elsewhere``)."""
    done = {r["step"] for r in steps_of(records)}
    done.update(s for e in events_of(records, "steps_completed_elsewhere") for s in e["steps"])
    return sorted(done)


def recovery_phases(records: list[dict], killed_at: float, backend: str = "gloo") -> list[tuple[str, float]]:
    """Where the time from a real kill (or a SIGTERM answered by a hand-off) to the next
    completed step went, from the survivors' first ``recovery`` and ``recovery_timeline``
    events (``killed_at``: when the signal was sent)."""
    rec = next(r for r in records if r.get("event") == "recovery")
    line = next(r for r in records if r.get("event") == "recovery_timeline")
    if rec["method"] == "handoff":  # a SIGTERM (``killed_at``) answered by a hand-off (ds_checkfree.elastic.preemption)
        return [("the preempted stage finishes its step (SIGTERM -> step done)", rec["step_done_at"] - killed_at),
                ("hand-off published, process gone -> error seen by the last stage",
                 rec["failed_at"] - rec["step_done_at"]),
                *_rebuild_phases(rec, line, backend, "re-materialisation (load the hand-off)"),
                ("total: SIGTERM -> next completed step", line["next_step_done_at"] - killed_at)]
    return [("detection (kill -> error seen by the last stage)", rec["failed_at"] - killed_at),
            *_rebuild_phases(rec, line, backend, "re-materialisation (CheckFree)"),
            ("total: kill -> next completed step", line["next_step_done_at"] - killed_at)]


def _rebuild_phases(rec, line, backend, remat) -> list[tuple[str, float]]:
    """The survivors' side, the same for a death and a hand-off."""
    nan = float("nan")
    leave = "close sockets" if backend == "gloo" else "abort + forget groups"
    return [(f"snapshot + {leave}", rec["revoked_at"] - rec["failed_at"]),
            ("  of which the in-memory snapshot", rec.get("snapshot_s", nan)),
            (f"  of which engine release + {backend} teardown", rec.get("close_s", nan)),
            ("agreement (coordinator round -> plan)", rec["agreed_at"] - rec["revoked_at"]),
            (f"data plane (new {backend} group)", rec["data_plane_s"]),
            ("engine rebuild (in-memory state)", rec["engine_rebuild_s"]),
            ("  of which module + its process groups", rec.get("rebuild_module_s", nan)),
            ("    of which forming the groups", rec.get("rebuild_groups_s", nan)),
            ("      this member's CPU time in them", rec.get("rebuild_groups_cpu_s", nan)),
            ("  of which DeepSpeed engine (config, optimizer)", rec.get("rebuild_engine_s", nan)),
            ("  of which loading the kept state", rec.get("rebuild_state_load_s", nan)),
            (remat, rec["rematerialise_s"]),
            ("redo the interrupted step", line["next_step_done_at"] - rec["rematerialised_at"])]
