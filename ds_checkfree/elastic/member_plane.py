"""A member's side of one generation's data plane: forming it, waking it when a round opens,
leaving it, and the sockets that must survive its wake (a standby coordinator's connection, the
shared store, the next generation's store client opened ahead).

A mixin of ``ElasticWorld``: it reads the member's roles and generation (``slot``,
``generation``, ``_round_announced``, ``_plan_steps``, ``progress``), its coordinator
(``client``), and shares its lock, under which a round's wake, the teardown and the exemption of
a socket never interleave. The backend's own ways (gloo, NCCL) are ``data_plane``'s.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

from ds_checkfree.elastic.plane_sockets import socket_inodes
from ds_checkfree.elastic.standby_groups import STEPS_BEFORE_FORMING, ready_key

#: members open their next store client over this many steps of a generation (``open_next_store_client``)
STORE_CLIENT_SPREAD = 8


class DataPlaneInterrupted(RuntimeError):
    """A membership round opened while the data plane was forming: form the next one instead."""


class MemberPlane:
    """Forming, waking and leaving this member's data plane (see the module docstring)."""

    def init_data_plane(self) -> None:
        """Form this generation's group of the stage holders (data-plane rank = slot)."""
        import torch.distributed as tdist
        self.shared_store()  # before ``prepare``: a socket opened later is the plane's, shut on a wake
        host, port = self.client.address[0], self.client.store_port
        ahead = self._next_store.take((host, port))  # opened while the last generation trained
        with self._lock:
            if self._round_announced > self.generation:
                raise DataPlaneInterrupted(f"the round for generation {self._round_announced} opened before "
                                           f"generation {self.generation}'s data plane formed")
            self.plane.prepare()
            if ahead is not None:  # this generation's socket from now on: its wake and teardown shut it
                self._include_in_wake(ahead[1])
            self._plane_formed = True
        os.environ.update({"RANK": str(self.slot), "WORLD_SIZE": str(self.num_stages * self.dp), "MASTER_ADDR": host,
                           "MASTER_PORT": str(port),
                           "LOCAL_RANK": os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")})
        # backstop: DeepSpeed's subgroups are created without a timeout (30 min by default);
        # make any op on them fail after the data-plane timeout instead (gloo; NCCL groups are aborted)
        from ds_checkfree.pipe.ds_private import set_default_group_timeout
        set_default_group_timeout(timedelta(seconds=self.dp_timeout_s))
        store = ahead[0] if ahead is not None else self._open_store_client(host, port)
        prefixed = tdist.PrefixStore(f"gen{self.generation}/", store)
        with self.plane.forming_default_group():
            tdist.init_process_group(self.plane.backend, store=prefixed, rank=self.slot,
                                     world_size=self.num_stages * self.dp,
                                     timeout=timedelta(seconds=self.dp_timeout_s))

    def _open_store_client(self, host: str, port: int):
        import torch.distributed as tdist
        return tdist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=self.dp_timeout_s),
                              wait_for_workers=False)

    def open_next_store_client(self) -> bool:
        """(between steps) Open the next generation's store client in the background, so that a
        recovery does not wait for a handshake with the coordinator's store (``store_clients``);
        returns whether one was started."""
        if not self._plane_formed or self.slot is None:
            return False
        # spread over the generation's first steps (slot % 8 + 1 steps in): tens of clients
        # connecting at one moment is what stalls torch's handshake
        if self.progress() - self._plan_steps <= self.slot % STORE_CLIENT_SPREAD:
            return False
        return self._next_store.prepare((self.client.address[0], self.client.store_port), self.generation) is not None

    def _keep_for_next_generation(self, inodes: set[str], generation: int) -> bool:
        """(the opening thread) Exempt a client opened ahead from this generation's wake, if the
        generation it was opened under is still the one formed: otherwise its sockets may be
        mixed with a forming plane's, and it is dropped."""
        with self._lock:
            if generation != self.generation or not self._plane_formed:
                return False
            self._exempt_locked(inodes)
            return True

    def _holders(self) -> dict[int, int]:
        """slot -> the member holding it, in the current generation."""
        return {slot: member for member, slot in self.roles.items() if slot is not None}

    def form_standby_groups(self, member_sets) -> bool:
        """(between steps) Form idle copies of this member's groups (``member_sets``: the
        engine's, ``standby_groups``) in the background, once per generation; returns whether
        the forming started. Each member starts ``STEPS_BEFORE_FORMING + slot % 8`` steps into
        the generation: the forming opens a store client, and tens of clients connecting at one
        moment stall torch's handshake for seconds, with the process's other threads (a round's
        wake among them) held up behind it (measured: a kill's detection 3 s late at 4x8)."""
        if not self.plane.keeps_standby_groups or not self._plane_formed or self.slot is None:
            return False
        if self.progress() - self._plan_steps < STEPS_BEFORE_FORMING + self.slot % STORE_CLIENT_SPREAD:
            return False
        where = (self.client.address[0], self.client.store_port)
        return self._standby_groups.prepare(where, self.generation, self.slot, self._holders(),
                                            member_sets) is not None

    def _keep_standby_copies(self, copies, client) -> bool:
        """(the forming thread) Exempt the copies' sockets from this generation's wake and write
        this member's ready mark, unless a round for a newer generation was announced (its wake
        may have shut some of them) or the generation changed: one atomic step with the wake."""
        with self._lock:
            if copies.generation != self.generation or not self._plane_formed \
                    or self._round_announced > self.generation:
                return False
            self._exempt_locked(copies.inodes)
            client.set(ready_key(copies.generation, copies.slot), "1")
        print(f"[member {self.rank}] generation {copies.generation}: idle copies of its {len(copies.made)} "
              "groups formed (a recovery keeps those without a lost slot)", flush=True)
        return True

    def kept_group(self, members: tuple[int, ...]):
        """(engine build) The idle copy of ``members``' group from the generation before, when
        every member of it can use its own (``standby_groups.promotable``), registered as this
        generation's group of ``members``; None: form it anew."""
        from ds_checkfree.elastic.c10d_private import register_group
        from ds_checkfree.elastic.standby_groups import set_key

        def ready_slots(generation: int, slots: list[int]) -> list[int]:
            try:
                return self.with_shared_store(lambda st: [s for s in slots if st.check([ready_key(generation, s)])])
            except (RuntimeError, OSError):  # no store to ask (a coordinator being replaced): form it
                return []

        taken = self._standby_groups.take(tuple(members), self.generation, self._holders(), ready_slots)
        if taken is None:
            return None
        group, store, inodes = taken
        register_group(group, store, f"standby{self.generation - 1}-{set_key(members)}", members)
        with self._lock:  # the group is this generation's now: its wake and teardown shut its sockets
            self._include_in_wake(inodes)
        return group

    def shared_store(self):
        """The coordinator's store outside every generation's prefix (where a preempted member
        publishes its stage, ``ds_checkfree.elastic.preemption``); one client per coordinator,
        made before the data plane forms (the gloo plane shuts every socket opened since), or,
        after a failover, exempted from that."""
        where = (self.client.address[0], self.client.store_port)
        if self._shared_store is None or self._shared_store_at != where:
            import torch.distributed as tdist
            before = set(socket_inodes().values())
            self._shared_store = tdist.TCPStore(where[0], where[1], is_master=False,
                                                timeout=timedelta(seconds=self.dp_timeout_s), wait_for_workers=False)
            self._shared_store_at = where
            self._exempt_from_wake(set(socket_inodes().values()) - before)
        return self._shared_store

    def with_shared_store(self, fn):
        """``fn(store)`` on the shared store; a client whose connection broke (a socket shut by a
        round's wake, a coordinator replaced under it: ``DistNetworkError: Broken pipe``) is
        dropped and ``fn`` runs once more on a fresh one."""
        try:
            return fn(self.shared_store())
        except RuntimeError:
            self._shared_store = None
            return fn(self.shared_store())

    def _exempt_from_wake(self, inodes: set[str]) -> None:
        """Sockets opened while a gloo data plane is formed that are not the plane's (a
        connection to a standby coordinator): a round's wake-up or the plane's teardown must not
        shut them. (Reads the gloo plane's record of the sockets it leaves alone,
        ``data_plane.GlooPlane._before``.)"""
        with self._lock:
            self._exempt_locked(inodes)

    def _exempt_locked(self, inodes: set[str]) -> None:
        before = getattr(self.plane, "_before", None)
        if isinstance(before, set):
            before.update(inodes)

    def _include_in_wake(self, inodes: set[str]) -> None:
        """(under the lock, after ``plane.prepare``) Sockets opened before this generation formed
        that belong to it: its wake and its teardown shut them."""
        before = getattr(self.plane, "_before", None)
        if isinstance(before, set):
            before.difference_update(inodes)

    def connect_socket(self, addr: str, port: int, timeout_s: float) -> socket.socket:
        """(failover) A connection to a standby coordinator, exempted from the data plane's
        socket shutdowns from the moment it exists: the wake and the teardown run under the same
        lock, so none can catch it in between."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with self._lock:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self._exempt_locked({os.readlink(f"/proc/self/fd/{sock.fileno()}")})
            except OSError:
                pass
        try:
            sock.settimeout(timeout_s)
            sock.connect((addr, port))
            return sock
        except OSError:
            sock.close()
            raise

    def _plane(self):
        from deepspeed.accelerator import get_accelerator

        from ds_checkfree.elastic.data_plane import plane_for
        return plane_for(get_accelerator().device_name(), log=lambda msg: print(f"[member] {msg}", flush=True),
                         timeout_s=self.dp_timeout_s)

    def tear_down_data_plane(self) -> None:
        """Leave this generation's groups so that peers blocked on this member fail now, not at
        the timeout, and the next generation can form (the caller must have dropped its engine,
        which holds the subgroups)."""
        with self._lock:  # the lock: a standby connection opened meanwhile is exempted first (``connect_socket``)
            self._plane_formed = False
            self.plane.leave()

    def _on_round(self, msg: dict) -> None:
        """(reader thread) A membership change is coming: wake a main thread blocked on the data plane."""
        generation = msg.get("generation", float("inf"))  # no generation: the coordinator is gone
        with self._lock:
            if generation <= self.generation:
                return  # a round this member already took part in
            self._round_announced = max(self._round_announced, generation)
            if self._plane_formed:
                self.plane.wake()
