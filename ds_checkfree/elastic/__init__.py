"""The elastic runtime: membership (coordinator, roster, client, discovery), stage-health
heartbeats, the data plane (process groups that can be woken, left and re-formed), preemption
hand-offs and the choice of a reachable address."""
