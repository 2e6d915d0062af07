"""Which address a rank advertises to its peers (data-plane rendezvous, gloo's device).

``gethostbyname(gethostname())`` is not it: Debian and Ubuntu map the hostname to
``127.0.1.1``, and a peer on another host then connects to its own loopback. The choice,
in order (the first that applies wins; the options are read from the environment so the
same command line works under mpirun, DeepSpeed's launcher and torchrun):

1. ``CHECKFREE_ADVERTISE_ADDR``: this host's address, verbatim (set it per host);
2. ``CHECKFREE_SOCKET_IFNAME``, ``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``: an interface
   (NCCL's syntax: comma-separated prefixes, ``=name`` exact, ``^a,b`` excluded);
3. Open MPI's ``btl_tcp_if_include`` (``OMPI_MCA_btl_tcp_if_include``, names or CIDRs): the
   network MPI itself was told to use;
4. one host only: ``127.0.0.1``;
5. the local address the kernel routes toward a peer host's addresses (a UDP ``connect``,
   which sends nothing);
6. the hostname's address, unless it is a loopback one;
7. the only non-loopback interface address.

Across hosts a loopback address is never chosen; if nothing fits, ``NoReachableAddress``
names what was tried and the options that fix it. ``choose`` is pure (interfaces, hostname
address and routes are passed in) so every rule is unit-tested; ``choose_here`` gathers them.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ds_checkfree.config.checkfree import ConfigError

ADDR_ENV = "CHECKFREE_ADVERTISE_ADDR"
IFNAME_ENVS = ("CHECKFREE_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
MPI_IF_ENV = "OMPI_MCA_btl_tcp_if_include"
FIX = (f"set {IFNAME_ENVS[0]}=<interface the hosts share> (e.g. eth0; export it to every rank: "
       f"mpirun -x {IFNAME_ENVS[0]}), or {ADDR_ENV}=<this host's address> on each host")


class NoReachableAddress(ConfigError):
    """No address of this host that peers on other hosts could reach (a launch problem the
    user fixes with an option, so it ends like a configuration error: one line, exit 2)."""


@dataclass(frozen=True)
class Choice:
    addr: str
    ifname: str | None  # the interface holding ``addr``, when known (for GLOO_SOCKET_IFNAME)
    how: str            # which rule chose it (logged, and named in errors)


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def ifname_matches(spec: str, ifaces: Mapping[str, str]) -> list[str]:
    """Interfaces (in ``ifaces`` order) selected by an NCCL/gloo-style ``*_SOCKET_IFNAME`` value."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    if exclude:
        spec = spec[1:]
    exact = spec.startswith("=")
    if exact:
        spec = spec[1:]
    items = [s.strip() for s in spec.split(",") if s.strip()]

    def hit(name: str) -> bool:
        return any(name == i if exact else name.startswith(i) for i in items)
    return [n for n in ifaces if hit(n) != exclude]


def mpi_if_matches(spec: str, ifaces: Mapping[str, str]) -> list[str]:
    """Interfaces named by Open MPI's ``btl_tcp_if_include`` (names or CIDR networks)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "/" in item:
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                continue
            out += [n for n, a in ifaces.items() if ipaddress.ip_address(a) in net and n not in out]
        elif item in ifaces and item not in out:
            out.append(item)
    return out


def _owner(addr: str, ifaces: Mapping[str, str]) -> str | None:
    return next((n for n, a in ifaces.items() if a == addr), None)


def choose(env: Mapping[str, str], ifaces: Mapping[str, str], *, multi_host: bool,
           hostname_addr: str | None = None, routes: Iterable[str] = ()) -> Choice:
    """The address to advertise. ``ifaces``: interface -> IPv4 address on this host;
    ``routes``: local source addresses the kernel picks toward the peer hosts."""
    tried = []

    def accept(addr: str, how: str) -> Choice | None:
        if multi_host and is_loopback(addr):
            tried.append(f"{addr} ({how}: loopback)")
            return None
        return Choice(addr, _owner(addr, ifaces), how)

    if env.get(ADDR_ENV):
        addr = env[ADDR_ENV].strip()
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise NoReachableAddress(f"{ADDR_ENV}={addr!r} is not an IP address") from None
        if multi_host and is_loopback(addr):
            raise NoReachableAddress(f"{ADDR_ENV}={addr} is a loopback address, but the job spans hosts: "
                                     "set it to an address the other hosts can reach")
        return Choice(addr, _owner(addr, ifaces), ADDR_ENV)
    for var in IFNAME_ENVS:
        if env.get(var):
            for n in ifname_matches(env[var], ifaces):
                picked = accept(ifaces[n], f"{var}={env[var]}")
                if picked:
                    return Choice(picked.addr, n, picked.how)
            raise NoReachableAddress(
                f"{var}={env[var]!r} selects no usable interface on {socket.gethostname()} "
                f"(IPv4 interfaces here: {_fmt(ifaces)}" + (f"; rejected: {', '.join(tried)}" if tried else "") + ")")
    if env.get(MPI_IF_ENV):
        for n in mpi_if_matches(env[MPI_IF_ENV], ifaces):
            picked = accept(ifaces[n], f"btl_tcp_if_include={env[MPI_IF_ENV]}")
            if picked:
                return Choice(picked.addr, n, picked.how)
        tried.append(f"btl_tcp_if_include={env[MPI_IF_ENV]} (no matching interface)")
    if not multi_host:
        return Choice("127.0.0.1", _owner("127.0.0.1", ifaces), "single host")
    for addr in routes:
        picked = accept(addr, "route to a peer host")
        if picked:
            return picked
    if hostname_addr:
        picked = accept(hostname_addr, "hostname")
        if picked:
            return picked
    others = [n for n, a in ifaces.items() if not is_loopback(a)]
    if len(others) == 1:
        return Choice(ifaces[others[0]], others[0], "only non-loopback interface")
    tried.append(f"interfaces {_fmt(ifaces)} ({len(others)} non-loopback: ambiguous)" if others
                 else f"interfaces {_fmt(ifaces)} (none non-loopback)")
    raise NoReachableAddress("no address of this host that peers on other hosts can reach; tried: "
                             + "; ".join(tried) + ". Fix: " + FIX)


def _fmt(ifaces: Mapping[str, str]) -> str:
    return ", ".join(f"{n}={a}" for n, a in ifaces.items()) or "none"


# -- gathering the facts on this host ----------------------------------------------------------

_SIOCGIFADDR = 0x8915


def interfaces() -> dict[str, str]:
    """Interface -> IPv4 address for every interface that has one (Linux ioctl)."""
    import fcntl
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:  # no IPv4 address
                continue
    return out


def route_source(peer: str) -> str | None:
    """The local address the kernel would use toward ``peer`` (UDP connect: no packet sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def hostname_addr() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def choose_here(env: Mapping[str, str], *, multi_host: bool, peer_addrs: Iterable[str] = (),
                route: Callable[[str], str | None] = route_source) -> Choice:
    """``choose`` with this host's interfaces, hostname address and routes toward ``peer_addrs``
    (addresses of ranks on other hosts)."""
    ifaces = interfaces()
    return choose(env, ifaces, multi_host=multi_host, hostname_addr=hostname_addr(),
                  routes=route_sources(peer_addrs, set(ifaces.values()), route))


def route_sources(peer_addrs: Iterable[str], local: set[str], route: Callable[[str], str | None]) -> list[str]:
    """Local source addresses toward the peers, most common first. Peer addresses that this
    host also has (a docker0 172.17.0.1 on every host) say nothing about the peer: skipped."""
    counts: dict[str, int] = {}
    for p in peer_addrs:
        if is_loopback(p) or p in local:
            continue
        src = route(p)
        if src:
            counts[src] = counts.get(src, 0) + 1
    return sorted(counts, key=lambda a: -counts[a])
