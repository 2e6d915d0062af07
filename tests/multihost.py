"""A two-host cluster on one machine, for tests: network namespaces as hosts.

Each "host" is a network namespace with its own address on a private bridge, its own
/etc/hosts (``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts``) and its own hostname
(a UTS namespace per command). ``mpirun`` reaches the other host through an agent script in
place of ssh. Launchers run *inside* hostA, like a login on a cluster's first node, so the
bridge needs no address in the machine's own namespace and no traffic leaves the namespaces.

Names carry the creating process's id: beds of concurrent sessions cannot collide, and
leftovers of a dead session are recognised and removed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

SUBNET = "10.77.0"  # private /24, exists only on the bridge between the namespaces
HOSTS = {"hostA": f"{SUBNET}.11", "hostB": f"{SUBNET}.12"}
_NAME = re.compile(r"^cf(\d+)-\d+(A|B|br)$")


def unavailable_reason() -> str | None:
    """Why the bed cannot be built here (None when it can)."""
    if os.geteuid() != 0:
        return "two-host test bed needs root (network namespaces, veth, bridge)"
    for tool in ("ip", "unshare", "nsenter", "getent"):
        if shutil.which(tool) is None:
            return f"two-host test bed needs `{tool}` (apt-get install iproute2 util-linux)"
    probe = f"cf{os.getpid()}-0A"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return f"cannot create network namespaces here: {err.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(ns: str) -> None:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def clean_stale() -> None:
    """Remove namespaces, links and hosts files left by test sessions that are gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        m = _NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            _kill_netns_processes(ns)
            _ip("netns", "del", ns, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
    netns_dir = Path("/etc/netns")
    if netns_dir.is_dir():
        for d in netns_dir.iterdir():
            m = _NAME.match(d.name)
            if m and not _alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)


class TwoHosts:
    """hostA and hostB on a bridge. ``ifname``: the interface name inside each host;
    ``debian_hosts``: each host's own name maps to 127.0.1.1, as Debian/Ubuntu install it."""

    _count = 0

    def __init__(self, workdir: Path, ifname: str = "eth0", debian_hosts: bool = False,
                 slots: dict[str, int] | None = None):
        TwoHosts._count += 1
        self.tag = f"cf{os.getpid()}-{TwoHosts._count}"
        self.ifname = ifname
        self.debian_hosts = debian_hosts
        self.slots = slots or {"hostA": 3, "hostB": 2}
        self.dir = Path(workdir)
        self.bridge = f"{self.tag}br"
        self.agent = self.dir / "agent"
        self.hostfile = self.dir / "hosts"

    def ns(self, host: str) -> str:
        return f"{self.tag}{host[-1]}"

    def hosts_file(self, host: str) -> str:
        lines = ["127.0.0.1 localhost"]
        for name, addr in HOSTS.items():
            lines.append(f"127.0.1.1 {name}" if self.debian_hosts and name == host else f"{addr} {name}")
        return "\n".join(lines) + "\n"

    def up(self) -> "TwoHosts":
        clean_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for host, addr in HOSTS.items():
            ns, veth = self.ns(host), self.ns(host)
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", f"{veth}p", "name", self.ifname)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.ifname)
            _ip("-n", ns, "link", "set", self.ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts_file(host))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.agent.write_text(
            "#!/bin/sh\n"
            "# mpirun's ssh: run the command on the namespace that plays host $1\n"
            f'host=$1; shift\nexec ip netns exec {self.tag}${{host#host}} unshare --uts /bin/sh -c "hostname $host; $*"\n')
        self.agent.chmod(0o755)
        self.hostfile.write_text("".join(f"{h} slots={n}\n" for h, n in self.slots.items()))
        return self

    def down(self) -> None:
        """Kill whatever still runs on the hosts, then remove namespaces, links and files."""
        for host in HOSTS:
            ns = self.ns(host)
            _kill_netns_processes(ns)
            _ip("netns", "del", ns, check=False)
            _ip("link", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)

    def on(self, host: str, cmd: list[str]) -> list[str]:
        """``cmd`` run on ``host`` (its namespace, /etc/hosts and hostname)."""
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "/bin/sh", "-c",
                f'hostname {host}; exec "$@"', "sh", *cmd]

    def hostname_of(self, pid: int) -> str:
        """The hostname a process sees (which host it runs on)."""
        return subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], check=True, capture_output=True,
                              text=True).stdout.strip()
