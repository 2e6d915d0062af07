"""A member's end of the coordinator connection: hello, heartbeats, check-ins, and the
coordinator's messages handed to the main thread.

One reader thread owns the socket's receiving side. Two messages cannot wait for the main
thread: ``round`` (a membership change is coming) calls ``on_round`` at once, so a main
thread blocked in a collective on a stalled peer is woken instead of waiting for the
data-plane timeout; ``evicted`` (this process was declared dead while stopped or hung)
ends the process: the job has already continued without it.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time

EXIT_EVICTED = 4


class CoordinatorLost(RuntimeError):
    """The connection to the coordinator closed: membership can no longer be agreed."""


class JoinRefused(RuntimeError):
    """The coordinator would not take this process (wrong configuration, job over)."""


class MemberClient:
    def __init__(self, address: tuple[str, int], *, id_hint: int | None, num_stages: int, addr: str,
                 connect_timeout_s: float = 60.0, on_round=None, on_member_lost=None, dp: int = 1):
        self.address = address
        self.on_round = on_round or (lambda msg: None)
        self.on_member_lost = on_member_lost or (lambda msg: None)
        self.inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self.finished = False
        self.sock = self._connect(address, connect_timeout_s)
        self._reader = self.sock.makefile("r", encoding="utf-8")
        self.send({"op": "hello", "id_hint": id_hint, "host": socket.gethostname(), "pid": os.getpid(),
                   "addr": addr, "num_stages": num_stages, "dp": dp})
        self.sock.settimeout(connect_timeout_s)
        line = self._reader.readline()
        self.sock.settimeout(None)
        welcome = json.loads(line) if line else {"op": "refused", "why": "the coordinator closed the connection"}
        if welcome.get("op") != "welcome":
            raise JoinRefused(f"coordinator {address[0]}:{address[1]} refused this process: {welcome.get('why')}")
        self.id: int = welcome["id"]
        self.store_port: int = welcome["store_port"]
        self._thread = threading.Thread(target=self._read, name="checkfree-membership", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(address, timeout_s: float) -> socket.socket:
        """Retry until the coordinator listens (it may start a moment after the job)."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(address, timeout=5.0)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as err:
                last = err
                time.sleep(0.2)
        raise CoordinatorLost(f"no coordinator at {address[0]}:{address[1]} after {timeout_s:g} s ({last}). Fix: "
                              "start it (python -m ds_checkfree.elastic.membership.coordinator ...) or check the address")

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._send_lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        try:
            for line in self._reader:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "evicted":
                    print(f"[member {self.id} pid {os.getpid()}] evicted from the job by the coordinator "
                          f"({msg.get('why')}): the others continued without this process; exiting",
                          file=sys.stderr, flush=True)
                    # under mpirun the job's exit status is the survivors': this process's work was
                    # taken over, so it leaves quietly; started by hand it says it was evicted
                    os._exit(0 if "OMPI_COMM_WORLD_RANK" in os.environ else EXIT_EVICTED)
                if op == "member_lost":
                    self.on_member_lost(msg)
                    continue
                if op == "round":
                    self.on_round(msg)
                self.inbox.put(msg)
        except (OSError, ValueError):
            pass
        if not self.finished:
            self.on_round({"op": "coordinator_lost"})
        self.inbox.put({"op": "coordinator_lost"})

    @staticmethod
    def query_job(address: tuple[str, int], timeout_s: float = 60.0) -> dict:
        """The running job's shape (stages, replicas, spares), asked before joining it."""
        sock = MemberClient._connect(address, timeout_s)
        try:
            sock.sendall(b'{"op": "info"}\n')
            sock.settimeout(timeout_s)
            line = sock.makefile("r", encoding="utf-8").readline()
        finally:
            sock.close()
        if not line:
            raise CoordinatorLost(f"the coordinator at {address[0]}:{address[1]} closed the connection")
        return json.loads(line)

    def next_message(self, timeout: float | None = None) -> dict | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.finished = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
