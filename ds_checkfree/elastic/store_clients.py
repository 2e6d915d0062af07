"""The next generation's store client, opened while the current generation trains.

Each generation's data plane rendezvouses through a TCPStore client of its own: a gloo plane
shuts every socket opened since it formed when a round opens (``data_plane``), the client's
too, so a member blocked in a rendezvous on a lost peer fails at once. Opening that client
inside a recovery puts a TCP handshake with the coordinator's store on the critical path, and
with ~30 members opening theirs at the same moment torch's client handshake stalled 5 s on the
development VM (``benchmarks/results/recovery_scaling.md``, 33 ranks). So once a generation
trains, each member opens the next generation's client in the background; the next data plane
takes it, checked alive first (a round's wake may have shut it meanwhile), or opens its own.
"""
from __future__ import annotations

import threading

from ds_checkfree.elastic.plane_sockets import socket_inodes


class NextStoreClient:
    """One client opened ahead, for one store address at a time."""

    def __init__(self, open_client, keep_open):
        """``open_client(host, port)`` returns a connected store client; ``keep_open(inodes,
        token)`` exempts its sockets from the current generation's wake and teardown (atomically
        with them: a wake that came first has shut them, which ``take`` finds out) and returns
        False when the generation ``token`` names is no longer the one formed (the client is
        then dropped: sockets opened meanwhile may be a new plane's, not only the client's)."""
        self._open, self._keep_open = open_client, keep_open
        self._lock = threading.Lock()
        self._ready: tuple[tuple[str, int], object, set[str]] | None = None  # (where, client, its socket inodes)
        self._opening = False
        self._thread: threading.Thread | None = None

    def prepare(self, where: tuple[str, int], token=None) -> threading.Thread | None:
        """Start opening a client to ``where`` in the background, unless one is ready for it or
        on its way; returns the opening thread, or None when none was started."""
        with self._lock:
            if self._opening or (self._ready is not None and self._ready[0] == where):
                return None
            self._opening = True
        thread = threading.Thread(target=self._open_ahead, args=(where, token), daemon=True,
                                  name="next-store-client")
        self._thread = thread
        thread.start()
        return thread

    def _open_ahead(self, where: tuple[str, int], token) -> None:
        try:
            before = set(socket_inodes().values())
            client = self._open(*where)
            inodes = set(socket_inodes().values()) - before
            if self._keep_open(inodes, token):
                with self._lock:
                    self._ready = (where, client, inodes)
        except Exception:  # noqa: BLE001 - an optimisation: the next data plane opens its own
            pass
        finally:
            with self._lock:
                self._opening = False

    def take(self, where: tuple[str, int]):
        """The client opened ahead for ``where`` and its socket inodes, if it still answers;
        None otherwise (none ready, another address, or its connection shut)."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None or ready[0] != where:
            return None
        _, client, inodes = ready
        try:
            client.num_keys()  # one round trip: a shut or reset connection raises here
        except Exception:  # noqa: BLE001 - DistNetworkError, RuntimeError: open a fresh one
            return None
        return client, inodes

    def close(self, timeout_s: float = 5.0) -> None:
        """Drop the client opened ahead, after waiting (bounded) for an opening in progress: a
        thread still inside torch's connect when the interpreter finalises ends the process
        with ``terminate called without an active exception``."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout_s)
        with self._lock:
            self._ready = None
