"""Stage-health heartbeats: pure liveness (``liveness``), a thread around it (``monitor``), and
two transports: the job's coordinator for the fault-tolerant launch (``coordinator``), the
rendezvous store for the ``deepspeed`` / ``torchrun`` launches (``store``). ``start_monitor``
is the one place that picks and starts one.
"""
from __future__ import annotations

from ds_checkfree.elastic.heartbeat.liveness import HeartbeatTracker, PeerState, liveness
from ds_checkfree.elastic.heartbeat.monitor import HeartbeatThread

__all__ = ["HeartbeatTracker", "PeerState", "liveness", "HeartbeatThread", "start_monitor"]


def start_monitor(cf, world=None, log=print, ab_window_s: float | None = None):
    """The run's heartbeat monitor, started; ``None`` when no transport is reachable.

    ``world``: the ``ElasticWorld`` of the fault-tolerant launch (beats to its coordinator,
    which decides who is dead, from before the data plane exists, spares included). Without it, beats
    go over the rendezvous store of the initialised torch.distributed group: those
    launchers end the job when a process dies, so that monitor reports, it cannot survive.
    ``ab_window_s``: the overhead benchmark's on/off windows (coordinator transport only; see
    ``monitor.ab_window_active``).
    """
    if world is not None:
        from ds_checkfree.elastic.heartbeat.coordinator import CoordinatorHeartbeat
        return CoordinatorHeartbeat(world.client, cf.heartbeat_interval_s, cf.heartbeat_timeout_s,
                                    ab_window_s=ab_window_s).start()
    import torch.distributed as dist

    from ds_checkfree.elastic.heartbeat.store import StoreHeartbeat
    try:
        return StoreHeartbeat(dist.get_rank(), dist.get_world_size(), cf.heartbeat_interval_s,
                              cf.heartbeat_timeout_s).start()
    except (KeyError, RuntimeError, OSError) as err:  # no reachable store: train without the monitor
        log(f"heartbeat monitor off: no rendezvous store reachable ({err})")
        return None
