"""The job's coordinator: a small process that owns membership, outside any MPI world.

Run it on a node that stays up (as torchrun's rendezvous host or torchft's lighthouse):

    python -m ds_checkfree.elastic.membership.coordinator --deepspeed_config ds_configs/checkfree.json \\
        --expect 5 --port 29400

Every member keeps one TCP connection to it (JSON lines): a closed connection is a dead
process at once, a silent one is declared dead after ``heartbeat_timeout_s`` (a stopped
or hung node: evicted). It beats back on every connection (``alive``), so a member also
knows when the coordinator is gone or silent. It hosts the data plane's rendezvous store:
generation ``g`` forms its gloo group under the store prefix ``gen<g>/``. The decisions live
in ``roster.Roster`` (pure); this file moves bytes (each member's through its own ``Sender``:
nothing is written under the lock) and ticks the clock. Under ``mpirun`` without
``--coordinator`` a rank starts one itself (``discovery``).

It is not a single point of failure: it hands every member the ordered list of standby
addresses (``standbys``), and when it is lost the first reachable member in that list starts
a new one (``--rebuild_s``: ``failover``), which collects the members' reports and rebuilds
the roster from them (``rebuild``). ``--no_failover`` hands out no list (the members then say
at start-up that a lost coordinator stops the job at its next membership change).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from ds_checkfree.elastic.membership.rebuild import Report, expected_members, not_reregistered, rebuild, rejoin
from ds_checkfree.elastic.membership.roster import CheckIn, Out, Roster
from ds_checkfree.elastic.membership.sender import Sender
from ds_checkfree.elastic.preemption import handoff_key

TICK_S = 0.05


@dataclass
class JobShape:
    """What a coordinator (the first or a standby) needs to know of the job."""
    num_stages: int
    expect: int
    dp: int = 1
    dead_after: float = 10.0
    startup_wait_s: float = 60.0
    join_wait_s: float = 60.0

    @property
    def spares(self) -> int:
        return self.expect - self.num_stages * self.dp

    def roster(self, now: float) -> Roster:
        return Roster(self.num_stages, self.expect, self.dead_after, self.startup_wait_s, self.join_wait_s, now,
                      dp=self.dp)


class Coordinator:
    def __init__(self, shape: JobShape, *, host: str = "0.0.0.0", port: int = 0, listener: socket.socket | None = None,
                 store_port: int = 0, log=None, rebuild_s: float | None = None, failover: bool = True,
                 beat_interval_s: float = 0.5):
        """``rebuild_s``: a standby replacing a lost coordinator: collect the members' reports
        for at most this long, then rebuild the roster from them. ``listener``: a socket already
        listening (the port a member reserved and handed out as its standby address)."""
        import torch.distributed as tdist
        from datetime import timedelta
        self.shape, self.failover, self.beat_interval_s = shape, failover, beat_interval_s
        self.log = log or (lambda msg: print(f"[coordinator] {msg}", flush=True))
        self.lock = threading.Lock()
        now = time.monotonic()
        self.roster: Roster | None = None if rebuild_s is not None else shape.roster(now)
        self.collect_until = now + (rebuild_s or 0.0)
        self.reports: dict[int, Report] = {}
        self.rebuilt = threading.Event()
        if self.roster is not None:
            self.rebuilt.set()
        self.conns: dict[int, tuple[socket.socket, Sender]] = {}
        self.listener = listener or socket.create_server((host, port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        # the data plane's rendezvous (and the preemption hand-offs): one store for this coordinator's life
        self.store = tdist.TCPStore(host, store_port, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=60))
        self.store_port = self.store.port
        self.ever_connected = False
        self._standbys_sent = None

    # -- delivery (under the lock: only queues) -------------------------------------------
    def _deliver(self, outs: list[Out]) -> None:
        for out in outs:
            if out.msg.get("op") in ("plan", "stop", "done", "evicted"):
                self.log(_describe(out))
            for mid in out.to:
                entry = self.conns.get(mid)
                if entry is None:
                    continue
                entry[1].send(out.msg)
                if out.close:
                    self.conns.pop(mid, None)
                    entry[1].close()

    def _apply(self, fn, *args) -> None:
        with self.lock:
            if self.roster is not None:
                self._deliver(fn(*args))

    def _standbys(self):
        if not self.failover:
            return None
        if self.roster is not None:
            return self.roster.standbys()
        return [[r.id, r.addr, r.standby_port] for _, r in sorted(self.reports.items()) if r.standby_port is not None]

    def _broadcast_standbys(self) -> None:
        standbys = self._standbys()
        if standbys is not None and standbys != self._standbys_sent:
            self._standbys_sent = standbys
            for _, sender in self.conns.values():
                sender.send({"op": "standbys", "list": standbys})

    # -- arrivals ------------------------------------------------------------------------
    def _admit(self, first: dict, now: float) -> tuple[int | None, list[Out], str]:
        """(member id or None, messages, why refused)."""
        if first["op"] == "hello":
            mid, outs = self.roster.hello(first.get("id_hint"), first.get("host", "?"), int(first.get("pid", 0)),
                                          first.get("addr", "?"), now, first.get("standby_port"))
            return mid, outs, f"the job is {self.roster.phase}"
        report = Report.from_message(first)
        if self.roster is None:  # collecting: the roster is rebuilt once every member reported
            self.reports[report.id] = report
            return report.id, [], ""
        ok, outs = rejoin(self.roster, report, now)
        return (report.id if ok else None), outs, (
            "it was declared lost while the coordinator was replaced: the job went on without this process")

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("r", encoding="utf-8")
        mid = None
        try:
            first = json.loads(reader.readline() or "null")
            op = first.get("op") if isinstance(first, dict) else None
            if op == "info":  # a joiner sizing its launch before it joins
                self.rebuilt.wait(self.collect_until - time.monotonic() + 5.0)
                sock.sendall((json.dumps({"op": "info", "num_stages": self.shape.num_stages, "dp": self.shape.dp,
                                          "spares": self.shape.spares,
                                          "phase": self.roster.phase if self.roster else "rebuilding"}) + "\n")
                             .encode())
                return
            if op not in ("hello", "rejoin"):
                return
            if first.get("num_stages") != self.shape.num_stages or first.get("dp", 1) != self.shape.dp:
                why = (f"this job runs {self.shape.num_stages} stages x {self.shape.dp} replicas but the process was "
                       f"started with {first.get('num_stages')} x {first.get('dp', 1)}: start it with the job's "
                       "DeepSpeed config")
                sock.sendall((json.dumps({"op": "refused", "why": why}) + "\n").encode())
                return
            if op == "hello" and not self.rebuilt.wait(self.collect_until - time.monotonic() + 5.0):
                sock.sendall(b'{"op": "refused", "why": "the coordinator is still rebuilding the job\'s roster"}\n')
                return
            with self.lock:
                mid, outs, why = self._admit(first, time.monotonic())
                if mid is not None:
                    self.ever_connected = True
                    old = self.conns.pop(mid, None)
                    if old is not None:  # a member that reconnected: its former connection is over
                        old[1].close()
                    sender = Sender(sock, str(mid))
                    self.conns[mid] = (sock, sender)
                    sender.send({"op": "welcome", "id": mid, "store_port": self.store_port,
                                 "standbys": self._standbys(), "beat_interval_s": self.beat_interval_s,
                                 "dead_after_s": self.shape.dead_after, "rebuilding": self.roster is None})
                    self.log(f"member {mid} ({first.get('host')} pid {first.get('pid')}) "
                             f"{'re-registered' if op == 'rejoin' else 'connected'}")
                    self._deliver(outs)
            if mid is None:
                sock.sendall((json.dumps({"op": "refused", "why": why}) + "\n").encode())
                return
            for line in reader:
                self._on_message(mid, json.loads(line), time.monotonic())
        except (OSError, ValueError):
            pass
        finally:
            if mid is not None:
                with self.lock:
                    if self.conns.get(mid, (None,))[0] is sock:
                        self.conns.pop(mid)[1].close()
                        self.log(f"member {mid}: connection closed")
                        if self.roster is not None:
                            self._deliver(self.roster.disconnected(mid, time.monotonic()))
                        else:
                            self.reports.pop(mid, None)
            try:
                sock.close()
            except OSError:
                pass

    def _on_message(self, mid: int, msg: dict, now: float) -> None:
        op = msg.get("op")
        with self.lock:
            if self.roster is None:  # collecting: keep the member's report current
                report = self.reports.get(mid)
                if report is not None and op == "checkin":
                    report.checkin = CheckIn(int(msg["steps_done"]), bool(msg["has_state"]))
                    report.checked_in_for = int(msg.get("for_generation") or report.generation + 1)
                elif report is not None and op == "finished":
                    report.finished = True
                return
            if op == "beat":
                self.roster.beat(mid, now, msg.get("steps"))
            elif op == "checkin":
                self._deliver(self.roster.checkin(mid, msg["steps_done"], msg["has_state"], now,
                                                  msg.get("for_generation")))
            elif op == "finished":
                self._deliver(self.roster.finished(mid, now))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    # -- the clock -----------------------------------------------------------------------
    def _maybe_rebuild(self, now: float) -> None:
        reports = list(self.reports.values())
        if not reports or (not expected_members(reports) <= set(self.reports) and now < self.collect_until):
            return
        self.roster, outs = rebuild(reports, self.shape.num_stages, self.shape.expect, self.shape.dead_after,
                                    self.shape.startup_wait_s, self.shape.join_wait_s, now, dp=self.shape.dp)
        r = self.roster
        rounds = [o.msg for o in outs if o.msg.get("op") == "round"]  # a round may open and close at once
        missing = not_reregistered(r)
        self.log(f"roster rebuilt from {len(reports)} member reports: generation {r.generation}, phase {r.phase}, "
                 f"roles {r.roles}, "
                 + (f"member(s) {missing} did not re-register, " if missing else "")
                 + (f"round for generation {rounds[0]['generation']} opened ({rounds[0]['why']})" if rounds
                    else "no round needed (the data plane is untouched)"))
        self._deliver(outs)
        for _, sender in self.conns.values():  # after the round it may have opened: members judge by it
            sender.send({"op": "rebuilt"})
        self.rebuilt.set()

    def _delete_settled_handoffs(self, settled: list[tuple[int, int]]) -> None:
        for slot, after in settled:
            key = handoff_key(slot, after)
            try:
                if self.store.delete_key(key):
                    self.log(f"preemption hand-off {key} deleted (every stage holder is past it)")
            except RuntimeError as err:
                self.log(f"could not delete {key}: {err}")

    def run(self, idle_exit_s: float = 120.0) -> int:
        """Serve until the job is over (done or stopped, and every member gone)."""
        threading.Thread(target=self._accept, daemon=True).start()
        empty_since, last_alive = None, 0.0
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            settled: list = []
            with self.lock:
                if self.roster is None:
                    self._maybe_rebuild(now)
                if self.roster is not None:
                    self._deliver(self.roster.tick(now))
                    settled = self.roster.settled_handoffs()
                phase = self.roster.phase if self.roster is not None else "rebuilding"
                self._broadcast_standbys()
                if now - last_alive >= self.beat_interval_s:
                    last_alive = now
                    for _, sender in self.conns.values():
                        sender.send({"op": "alive"})
                connected = len(self.conns)
            self._delete_settled_handoffs(settled)
            empty_since = None if connected else (empty_since or now)
            if phase in ("done", "stopped") and not connected:
                self.log(f"job {phase}; exiting")
                return 0 if phase == "done" else 3
            if empty_since is not None and now - empty_since > (idle_exit_s if not self.ever_connected else 10.0):
                self.log(f"no member connected for {now - empty_since:.0f} s; exiting")
                return 4


def _describe(out: Out) -> str:
    m = out.msg
    if m["op"] == "plan":
        return (f"generation {m['generation']}: roles {m['roles']}, dead {m['dead']}, evicted {m['evicted']}, "
                f"lost stages {m['lost']}, replacements {m['replacements']}, resume at step {m['resume_step']}"
                f"{' (fresh start)' if m['fresh'] else ''} [{m.get('why', '')}]")
    if m["op"] == "stop":
        return f"stopping the job: {m['why']}"
    if m["op"] == "evicted":
        return f"member(s) {out.to} evicted: {m['why']}"
    return f"training finished (reported by member {m.get('by')}); evicted: {m.get('evicted')}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", default=None, help="the job's DeepSpeed JSON (reads its checkfree section)")
    p.add_argument("--expect", type=int, required=True, help="processes launched with the job (stages + spares)")
    p.add_argument("--num_stages", type=int, default=None)
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas per stage")
    p.add_argument("--heartbeat_timeout_s", type=float, default=None)
    p.add_argument("--startup_wait_s", type=float, default=None)
    p.add_argument("--join_wait_s", type=float, default=None)
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    p.add_argument("--port", type=int, default=29400, help="0: any free port")
    p.add_argument("--announce", default=None, help="write {host, port, store_port} JSON here once listening")
    p.add_argument("--heartbeat_interval_s", type=float, default=None,
                   help="how often this coordinator beats back to each member (default: the config's)")
    p.add_argument("--no_failover", action="store_true",
                   help="hand the members no standby list: a lost coordinator then stops the job at its next "
                        "membership change (the members say so at start-up)")
    p.add_argument("--listen_fd", type=int, default=None,
                   help="(standby) serve on this inherited listening socket instead of --host/--port")
    p.add_argument("--rebuild_s", type=float, default=None,
                   help="(standby) replace a lost coordinator: collect the members' reports for at most this "
                        "long, then rebuild the roster from them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError
    section = {}
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config, encoding="utf-8") as f:
                section = json.load(f).get("checkfree", {})
        except (OSError, json.JSONDecodeError) as err:
            print(f"configuration error: --deepspeed_config {args.deepspeed_config!r}: {err}", file=sys.stderr)
            return 2
    for key in ("num_stages", "heartbeat_timeout_s", "heartbeat_interval_s", "startup_wait_s", "join_wait_s"):
        if getattr(args, key) is not None:
            section[key] = getattr(args, key)
    try:
        cf = CheckFreeConfig.from_dict(section)
        if args.dp < 1 or args.expect < cf.num_stages * args.dp:
            raise ConfigError(f"--expect = {args.expect}, --dp = {args.dp}: fewer processes than the "
                              f"{cf.num_stages} stages x {args.dp} replicas. Fix: --expect <stages x dp + spares>")
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    shape = JobShape(cf.num_stages, args.expect, args.dp, cf.heartbeat_timeout_s, cf.startup_wait_s, cf.join_wait_s)
    listener = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else None
    coord = Coordinator(shape, host=args.host, port=args.port, listener=listener, rebuild_s=args.rebuild_s,
                        failover=not args.no_failover, beat_interval_s=cf.heartbeat_interval_s)
    where = f"{coord.listener.getsockname()[0]}:{coord.port}"
    coord.log(f"{'standby: replacing a lost coordinator, ' if args.rebuild_s is not None else ''}listening on {where} "
              f"(data-plane store on port {coord.store_port}); "
              f"{cf.num_stages} stages x {args.dp} replicas, expecting {args.expect} processes, heartbeat timeout "
              f"{cf.heartbeat_timeout_s:g} s, start-up wait {cf.startup_wait_s:g} s, join wait {cf.join_wait_s:g} s"
              f"{', failover off (no standby list)' if args.no_failover else ''}")
    if args.announce:
        tmp = args.announce + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"port": coord.port, "store_port": coord.store_port, "pid": os.getpid()}, f)
        os.replace(tmp, args.announce)
    return coord.run()


if __name__ == "__main__":
    sys.exit(main())
