"""Membership of the fault-tolerant job, outside any MPI world: the coordinator's pure state
(``roster``), the coordinator process (``coordinator``), a member's connection (``client``),
and the data-plane wake-up (``plane_sockets``)."""
