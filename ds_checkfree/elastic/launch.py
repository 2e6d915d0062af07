"""Joining the fault-tolerant job: what a member does before its first engine.

Under ``mpirun --with-ft ulfm`` (or ``--join HOST:PORT`` by hand) every process becomes a
member of the job through the coordinator, starts its stage-health heartbeat, and either gets
a stage at once or waits as a spare until a lost stage needs it. ``launch/train.py`` and
``Manager.start`` (a user's own loop) both come in through here.
"""
from __future__ import annotations

import os


def under_fault_tolerant_mpi() -> bool:
    """``mpirun --with-ft ulfm`` (also via ``deepspeed --launcher_args``) sets this for every rank."""
    return "OMPI_COMM_WORLD_SIZE" in os.environ and \
        os.environ.get("OMPI_MCA_mpi_ft_enable", "0") not in ("0", "", "false")


def join_elastic_job(setup, *, output_dir=None, coordinator=None, heartbeat: bool = True, ab_window_s=None,
                     while_spare=None, log=print):
    """Become a member; returns ``(world, joined, monitor)``: ``joined`` is the ``Agreement``
    that gave this process a lost stage (None for a stage holder from the start); ``world`` is
    None for a spare released at the end of training (its monitor stopped, its world closed).
    ``while_spare()`` runs once while a spare waits (warm-ups off a later recovery's path)."""
    import faulthandler
    import signal

    from ds_checkfree.elastic.heartbeat import start_monitor
    from ds_checkfree.elastic.world import ElasticWorld
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    cf = setup.checkfree
    world = ElasticWorld(cf.num_stages, cf.spares, dp_timeout_s=cf.data_plane_timeout_s, coordinator=coordinator,
                         joining="OMPI_COMM_WORLD_SIZE" not in os.environ, cf=cf, log_dir=output_dir,
                         dp=setup.dp_size)
    who = f"member {world.rank}"
    monitor = start_monitor(cf, world=world, ab_window_s=ab_window_s) if heartbeat else None
    try:
        agreement = world.join_job()
        if world.stage is None:
            log(f"[{who}] spare: waiting for a stage to replace")
            if while_spare is not None:
                while_spare()
            agreement = world.wait_as_spare()
            if agreement is None:
                log(f"[{who}] spare: released, training finished")
                if monitor is not None:
                    monitor.stop()
                world.close()
                return None, None, None
            log(f"[{who}] spare: taking the place of stage {world.stage}")
        elif agreement is not None and not agreement.fresh:
            log(f"[{who}] joined: taking the place of stage {world.stage}")
    except BaseException:
        if monitor is not None:
            monitor.stop()
        world.close()
        raise
    joined = agreement if agreement is not None and not agreement.fresh else None
    return world, joined, monitor
