"""Membership of the fault-tolerant job, outside any MPI world: the coordinator's pure state
(``roster``), the coordinator process (``coordinator``, its per-member ``sender``), a member's
connection (``client``), where the coordinator is (``discovery``), and its failover: the standby
rule (``failover``), a member's standby coordinator (``standby``) and the roster rebuilt from the
members' reports (``rebuild``)."""
