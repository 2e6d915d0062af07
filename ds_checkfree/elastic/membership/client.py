"""A member's end of the coordinator connection: hello, heartbeats, check-ins, and the
coordinator's messages handed to the main thread.

One reader thread owns the socket's receiving side. Two messages cannot wait for the main
thread: ``round`` (a membership change is coming) calls ``on_round`` at once, so a main
thread blocked in a collective on a stalled peer is woken instead of waiting for the
data-plane timeout; ``evicted`` (this process was declared dead while stopped or hung)
ends the process: the job has already continued without it.

Losing the coordinator (the connection closes, or no ``alive`` for ``heartbeat_timeout_s``)
is not a membership change: the data plane is left alone and training goes on, while the
reader thread finds the standby coordinator (``failover``) and re-registers there with this
member's report; meanwhile ``send`` drops messages (the report carries what matters).
"""
from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time

from ds_checkfree.elastic.membership import failover

EXIT_EVICTED = 4


class CoordinatorLost(RuntimeError):
    """The connection to the coordinator closed: membership can no longer be agreed."""


class JoinRefused(RuntimeError):
    """The coordinator would not take this process (wrong configuration, job over)."""


def say(msg: str) -> None:
    """A line on stderr from a background thread: never raises (after ``mpirun`` is gone, its
    stderr pipe is closed, and a BrokenPipeError would end the thread that must keep reading)."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _leave(member, why: str) -> None:
    """The job went on without this process: under mpirun the job's exit status is the
    survivors' (this process's work was taken over), so it leaves quietly; started by hand
    it says it was evicted."""
    say(f"[member {member} pid {os.getpid()}] {why}: the others continued without this process; exiting")
    os._exit(0 if "OMPI_COMM_WORLD_RANK" in os.environ else EXIT_EVICTED)


class MemberClient:
    def __init__(self, address: tuple[str, int], *, id_hint: int | None, num_stages: int, addr: str,
                 connect_timeout_s: float = 60.0, on_round=None, on_member_lost=None, dp: int = 1,
                 standby_port: int | None = None, hooks=None):
        """``hooks``: the member's side of a failover (``ElasticWorld``): ``report()``,
        ``start_standby(position)``, ``reconnected(sock, welcome, address)``; None: no failover."""
        self.on_round = on_round or (lambda msg: None)
        self.on_member_lost = on_member_lost or (lambda msg: None)
        self.hooks = hooks
        self.inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self._connected = threading.Event()
        self.finished = False
        self.job_over = False  # done or stop received: a closed connection then is the end, not a loss
        self.gave_up = False   # the coordinator was lost and no standby answered: no membership any more
        self.progress = lambda: None  # this member's last completed step, sent with each beat
        sock = self._connect(address, connect_timeout_s)
        reader = sock.makefile("r", encoding="utf-8")
        sock.sendall((json.dumps({"op": "hello", "id_hint": id_hint, "host": socket.gethostname(),
                                  "pid": os.getpid(), "addr": addr, "num_stages": num_stages, "dp": dp,
                                  "standby_port": standby_port}) + "\n").encode())
        sock.settimeout(connect_timeout_s)
        line = reader.readline()
        sock.settimeout(None)
        welcome = json.loads(line) if line else {"op": "refused", "why": "the coordinator closed the connection"}
        if welcome.get("op") != "welcome":
            raise JoinRefused(f"coordinator {address[0]}:{address[1]} refused this process: {welcome.get('why')}")
        self.id: int = welcome["id"]
        self._adopt(sock, reader, welcome, address)
        self._thread = threading.Thread(target=self._read, name="checkfree-membership", daemon=True)
        self._thread.start()

    def _adopt(self, sock: socket.socket, reader, welcome: dict, address: tuple[str, int]) -> None:
        with self._send_lock:
            self.sock, self._reader, self.address = sock, reader, tuple(address)
            self.store_port: int = welcome["store_port"]
            #: the standby addresses, [id, addr, port] by id; None: the coordinator has no failover
            self.standbys: list | None = welcome.get("standbys")
            #: the coordinator beats back: silent this long, it is lost (None: an older coordinator)
            self.silence_s: float | None = welcome.get("dead_after_s")
            #: a standby still collecting the members' reports (until its ``rebuilt``)
            self.rebuilding = bool(welcome.get("rebuilding"))
            if self.silence_s:
                sock.settimeout(self.silence_s)
            self._connected.set()

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

    def send(self, msg: dict) -> bool:
        """Send one message; False (dropped) while the coordinator is lost."""
        data = (json.dumps(msg) + "\n").encode()
        with self._send_lock:
            if not self._connected.is_set():
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def membership_settled(self) -> bool:
        """False while the coordinator is being replaced (lost, or its standby still rebuilding
        the roster): a verdict on a member cannot come before that is over."""
        return self._connected.is_set() and not self.rebuilding

    def _read(self) -> None:
        try:
            while True:
                self._read_messages()
                if self.finished or self.job_over:
                    return
                self._connected.clear()
                if not self._fail_over():
                    break
        except Exception as err:  # noqa: BLE001 - this thread must not end without telling the main thread
            say(f"[member {self.id}] membership thread failed: {type(err).__name__}: {err}")
        self._connected.clear()
        self.gave_up = True
        self.inbox.put({"op": "coordinator_lost"})

    def _read_messages(self) -> None:
        """Hand the coordinator's messages on until its connection closes or goes silent."""
        try:
            for line in self._reader:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "alive":
                    continue
                if op == "evicted":
                    _leave(self.id, f"evicted from the job by the coordinator ({msg.get('why')})")
                if op == "standbys":
                    self.standbys = msg["list"]
                    continue
                if op == "rebuilt":
                    self.rebuilding = False
                    continue
                if op == "member_lost":
                    self.on_member_lost(msg)
                    continue
                if op in ("done", "stop"):
                    self.job_over = True
                if op == "round":
                    self.on_round(msg)
                self.inbox.put(msg)
        except (OSError, ValueError):
            pass

    def _warn(self, msg: str) -> None:
        say(f"[member {self.id}] {msg}")

    def _fail_over(self) -> bool:
        """Find the standby coordinator and re-register there; False when there is none."""
        lost, t0 = f"{self.address[0]}:{self.address[1]}", time.monotonic()
        if self.standbys is None or self.hooks is None:
            self._warn(f"the coordinator at {lost} was lost and this job has no standby coordinator (failover "
                       "off): training goes on, and the next membership change stops the job")
            return False
        self._warn(f"the coordinator at {lost} was lost: training goes on; reconnecting to the first live "
                   f"standby in member-id order {[s[0] for s in self.standbys]}")
        position = next((i for i, s in enumerate(self.standbys) if s[0] == self.id), len(self.standbys))
        old = self.sock  # closed once the walk is over: a live coordinator takes the member back first
        try:
            found = failover.walk(list(self.standbys), self.id, lambda: self.hooks.start_standby(position),
                                  self.hooks.report, (self.silence_s or 10.0) + failover.WELCOME_SLACK_S, self._warn,
                                  connect=self.hooks.connect_socket, lost=tuple(self.address))
        except failover.Refused as err:
            _leave(self.id, f"the coordinator refused this member ({err})")
        finally:
            try:
                old.close()  # a coordinator that was only silent (stopped) finds it closed if it wakes
            except OSError:
                pass
        if found is None:
            self._warn("no standby coordinator answered: training goes on without membership; the next "
                       "membership change stops the job")
            return False
        sock, reader, welcome, address = found
        self._adopt(sock, reader, welcome, address)
        self.hooks.reconnected(sock, welcome, address)
        self._warn(f"re-registered with the coordinator at {address[0]}:{address[1]} "
                   f"{time.monotonic() - t0:.1f} s after losing {lost}")
        return True

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
