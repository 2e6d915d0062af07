"""The private torch.distributed (c10d) surface the elastic data plane relies on, in one place.

Leaving a generation's process groups behind after a peer died must not block on that peer.
Under gloo ``destroy_process_group`` does not; under NCCL it does (measured on an H200 with
torch 2.11 / NCCL 2.28: ``destroy_process_group`` after the backend's ``abort`` hung for over
40 s; docs/gpu.md, "NCCL after a peer's death"), because it shuts every group down
gracefully. ``forget_groups``
does the same bookkeeping as ``destroy_process_group`` (so ``init_process_group`` can form the
next generation) but shuts nothing down: the caller aborts the groups first and keeps the
objects alive, so no destructor ever waits on the dead peer either (torchft's approach).
``form_gloo_group`` and ``register_group`` build a gloo group outside the registry (an idle
copy formed in the background, ``standby_groups``) and register it when a recovery keeps it,
as ``new_group`` would have. ``work_class`` is the class whose ``wait`` the gloo plane routes through a waiter thread
(``plane_waits``: a wait gloo leaves stranded must not hold the member).
``tests/test_data_plane.py`` fails when a member used here disappears.
"""
from __future__ import annotations

#: c10d module-level members used here (``torch.distributed.distributed_c10d``) -> why
PRIVATE_MEMBERS: dict[str, str] = {
    "_world": "the registry of every process group (default group, names, ranks, tags)",
    "_update_default_pg": "unset the default group without shutting it down",
    "_unregister_all_process_groups": "free the group names for the next generation",
    "_register_pg_in_world": "register an idle group formed outside the registry when a recovery keeps it",
    "BackendConfig": "the devices a gloo group serves (as torch registers them)",
}
#: ``ProcessGroup`` members used to assemble a group outside torch's registry (``form_gloo_group``)
PROCESS_GROUP_MEMBERS = ("_set_default_backend", "_register_backend", "_set_group_name")
#: attributes of ``_world`` cleared, as ``destroy_process_group`` clears them (each optional:
#: a torch that lacks one has nothing to clear)
_WORLD_MAPS = ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "pg_to_tag", "tags_to_pg",
               "pg_coalesce_state")


def missing_members() -> list[str]:
    """Names from ``PRIVATE_MEMBERS`` that the installed torch no longer has."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    missing = [name for name in PRIVATE_MEMBERS if not hasattr(c10d, name)]
    if not hasattr(dist.ProcessGroup, "abort"):  # public since torch 2.6; ``abort_groups`` calls it
        missing.append("ProcessGroup.abort")
    missing += [f"ProcessGroup.{name}" for name in PROCESS_GROUP_MEMBERS if not hasattr(dist.ProcessGroup, name)]
    if not hasattr(getattr(dist, "ProcessGroupGloo", None), "_set_sequence_number_for_group"):
        missing.append("ProcessGroupGloo._set_sequence_number_for_group")
    if not callable(getattr(work_class(), "wait", None)):  # what every blocking call ends in
        missing.append("Work.wait")
    return missing


def work_class():
    """The class of every handle a c10d operation returns (``torch.distributed.Work``): the
    blocking calls (send, recv, all_reduce, barrier, ...) end in its ``wait``."""
    from torch._C._distributed_c10d import Work
    return Work


def registered_groups() -> list:
    """Every process group this process is a member of, the default group first."""
    from torch.distributed import distributed_c10d as c10d
    groups = list(c10d._world.pg_map)
    default = c10d._world.default_pg
    return sorted(groups, key=lambda pg: pg is not default)


def abort_groups(groups) -> list[str]:
    """``abort()`` each group (its operations in flight fail, pending ones are dropped); returns
    one line per group whose abort raised (an abort must not stop the others). Safe from a
    thread other than the one blocked in the group's operation."""
    errors = []
    for pg in groups:
        try:
            pg.abort()
        except Exception as err:  # noqa: BLE001 - best effort, reported by the caller
            errors.append(f"{getattr(pg, 'group_name', '?')}: {type(err).__name__}: {err}")
    return errors


def forget_groups(keep_alive: list) -> int:
    """Unregister every process group without shutting any down and append them to
    ``keep_alive`` (their destructors must not run: under NCCL they would wait on the dead
    peer). Afterwards ``torch.distributed.is_initialized()`` is False and the next generation
    can call ``init_process_group`` (under a fresh store prefix: the old groups' keys remain).
    Returns how many groups were forgotten."""
    from torch.distributed import distributed_c10d as c10d
    world = c10d._world
    groups = registered_groups()
    keep_alive.extend(groups)
    c10d._update_default_pg(None)
    for name in _WORLD_MAPS:
        table = getattr(world, name, None)
        if table is not None:
            table.clear()
    c10d._unregister_all_process_groups()
    world.group_count = 0  # group names restart at 0, as after destroy_process_group
    return len(groups)


def form_gloo_group(store, rank: int, size: int, timeout, name: str):
    """A gloo group of ``size`` members formed through ``store`` (connected when this returns)
    the way ``new_group`` forms one, but not registered: torch's registry, its group counter and
    the current default group are left alone (safe on a thread other than the main one)."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    pg = dist.ProcessGroup(store, rank, size)
    pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    backend = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", store), rank, size, timeout)
    backend._set_sequence_number_for_group()
    for device in c10d.BackendConfig(dist.Backend.GLOO).get_device_backend_map():
        pg._register_backend(torch.device(device), dist.ProcessGroup.BackendType.GLOO, backend)
    pg._set_group_name(name)
    return pg


def register_group(pg, store, name: str, ranks) -> None:
    """Register ``pg`` (from ``form_gloo_group``) in the current generation's registry as the
    group of ``ranks`` (global ranks, in group-rank order): collectives, ``get_rank(group)`` and
    the generation's teardown then treat it as any group ``new_group`` formed."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    c10d._register_pg_in_world(pg, backend_name=dist.Backend.GLOO, store=store, group_name=name,
                               backend_config=str(c10d.BackendConfig(dist.Backend.GLOO)),
                               rank_mapping={g: i for i, g in enumerate(ranks)})
