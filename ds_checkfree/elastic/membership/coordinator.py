"""The job's coordinator: a small process that owns membership, outside any MPI world.

Run it on a node that stays up (as torchrun's rendezvous host or torchft's lighthouse):

    python -m ds_checkfree.elastic.membership.coordinator --deepspeed_config ds_configs/checkfree.json \\
        --expect 5 --port 29400

Every member keeps one TCP connection to it (JSON lines): a closed connection is a dead
process at once, a silent one is declared dead after ``heartbeat_timeout_s`` (a stopped
or hung node: evicted). It also hosts the data plane's rendezvous store: generation ``g``
forms its gloo group under the store prefix ``gen<g>/``, so no member waits on a store
that died with a former leader. The decisions live in ``roster.Roster`` (pure); this file
only moves bytes and ticks the clock. Under ``mpirun`` without ``--coordinator`` the rank-0
process starts one itself (``ds_checkfree.elastic.world``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

from ds_checkfree.elastic.membership.roster import Out, Roster

TICK_S = 0.05


class Coordinator:
    def __init__(self, roster: Roster, num_stages: int, host: str = "0.0.0.0", port: int = 0,
                 store_port: int = 0, log=None, dp: int = 1, spares: int = 0):
        import torch.distributed as tdist
        self.roster, self.num_stages, self.dp, self.spares = roster, num_stages, dp, spares
        self.log = log or (lambda msg: print(f"[coordinator] {msg}", flush=True))
        self.lock = threading.Lock()
        self.conns: dict[int, tuple[socket.socket, threading.Lock]] = {}
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        from datetime import timedelta
        # the data plane's rendezvous: one store for the job's whole life
        self.store = tdist.TCPStore(host, store_port, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=60))
        self.store_port = self.store.port
        self._stop = threading.Event()
        self.ever_connected = False

    # -- delivery ----------------------------------------------------------------------
    def _deliver(self, outs: list[Out]) -> None:
        for out in outs:
            if out.msg.get("op") in ("plan", "stop", "done", "evicted"):
                self.log(_describe(out))
            data = (json.dumps(out.msg) + "\n").encode()
            for mid in out.to:
                entry = self.conns.get(mid)
                if entry is None:
                    continue
                sock, send_lock = entry
                try:
                    with send_lock:
                        sock.sendall(data)
                except OSError:
                    pass  # its reader notices the closed connection
                if out.close:
                    self.conns.pop(mid, None)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _apply(self, fn, *args) -> None:
        with self.lock:
            outs = fn(*args)
            self._deliver(outs)

    # -- per connection ----------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("r", encoding="utf-8")
        mid = None
        try:
            first = json.loads(reader.readline() or "null")
            if first and first.get("op") == "info":  # a joiner sizing its launch before it joins
                sock.sendall((json.dumps({"op": "info", "num_stages": self.num_stages, "dp": self.dp,
                                          "spares": self.spares, "phase": self.roster.phase}) + "\n").encode())
                return
            if not first or first.get("op") != "hello":
                return
            if first.get("num_stages") != self.num_stages or first.get("dp", 1) != self.dp:
                sock.sendall((json.dumps({"op": "refused", "why": (
                    f"this job runs {self.num_stages} stages x {self.dp} replicas but the process was started "
                    f"with {first.get('num_stages')} x {first.get('dp', 1)}: start it with the job's DeepSpeed "
                    "config")}) + "\n").encode())
                return
            with self.lock:
                mid, outs = self.roster.hello(first.get("id_hint"), first.get("host", "?"), int(first.get("pid", 0)),
                                              first.get("addr", "?"), time.monotonic())
                if mid is None:
                    sock.sendall((json.dumps({"op": "refused", "why": f"the job is {self.roster.phase}"}) + "\n")
                                 .encode())
                    return
                self.ever_connected = True
                self.conns[mid] = (sock, threading.Lock())
                sock.sendall((json.dumps({"op": "welcome", "id": mid, "store_port": self.store_port,
                                          "generation": self.roster.generation}) + "\n").encode())
                self.log(f"member {mid} ({first.get('host')} pid {first.get('pid')}"
                         f"{', joining' if self.roster.members[mid].joiner else ''}) connected")
                self._deliver(outs)
            for line in reader:
                msg = json.loads(line)
                op, now = msg.get("op"), time.monotonic()
                if op == "beat":
                    with self.lock:
                        self.roster.beat(mid, now)
                elif op == "checkin":
                    self._apply(self.roster.checkin, mid, msg["steps_done"], msg["has_state"], now,
                                msg.get("for_generation"))
                elif op == "suspect":
                    self._apply(self.roster.suspect, mid, msg.get("why", "?"), now)
                elif op == "finished":
                    self._apply(self.roster.finished, mid, now)
        except (OSError, ValueError):
            pass
        finally:
            if mid is not None:
                with self.lock:
                    if self.conns.get(mid, (None,))[0] is sock:
                        self.conns.pop(mid, None)
                        self.log(f"member {mid}: connection closed")
                        self._deliver(self.roster.disconnected(mid, time.monotonic()))
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def run(self, idle_exit_s: float = 120.0) -> int:
        """Serve until the job is over (done or stopped, and every member gone)."""
        threading.Thread(target=self._accept, daemon=True).start()
        empty_since = None
        while True:
            time.sleep(TICK_S)
            with self.lock:
                self._deliver(self.roster.tick(time.monotonic()))
                phase, connected = self.roster.phase, len(self.conns)
            now = time.monotonic()
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError
    section = {}
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config, encoding="utf-8") as f:
                section = json.load(f).get("checkfree", {})
        except (OSError, json.JSONDecodeError) as err:
            print(f"configuration error: --deepspeed_config {args.deepspeed_config!r}: {err}", file=sys.stderr)
            return 2
    for key in ("num_stages", "heartbeat_timeout_s", "startup_wait_s", "join_wait_s"):
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
    roster = Roster(cf.num_stages, args.expect, cf.heartbeat_timeout_s, cf.startup_wait_s, cf.join_wait_s,
                    time.monotonic(), dp=args.dp)
    coord = Coordinator(roster, cf.num_stages, args.host, args.port, dp=args.dp,
                        spares=args.expect - cf.num_stages * args.dp)
    coord.log(f"listening on {args.host}:{coord.port} (data-plane store on port {coord.store_port}); "
              f"{cf.num_stages} stages x {args.dp} replicas, expecting {args.expect} processes, heartbeat timeout "
              f"{cf.heartbeat_timeout_s:g} s, start-up wait {cf.startup_wait_s:g} s, join wait {cf.join_wait_s:g} s")
    if args.announce:
        tmp = args.announce + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"port": coord.port, "store_port": coord.store_port, "pid": os.getpid()}, f)
        os.replace(tmp, args.announce)
    return coord.run()


if __name__ == "__main__":
    sys.exit(main())
