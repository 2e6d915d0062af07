"""The address a rank advertises: every rule of ``netaddr.choose``, and the real probes."""
from __future__ import annotations

import pytest

from ds_checkfree.elastic import addresses as netaddr
from ds_checkfree.elastic.addresses import NoReachableAddress, choose

IFACES = {"lo": "127.0.0.1", "eth0": "10.0.0.5", "ib0": "192.168.1.5", "docker0": "172.17.0.1"}


def test_debian_hostname_address_is_never_chosen_across_hosts():
    # the bug: gethostbyname(gethostname()) == 127.0.1.1; the route toward a peer wins
    c = choose({}, IFACES, multi_host=True, hostname_addr="127.0.1.1", routes=["10.0.0.5"])
    assert (c.addr, c.ifname, c.how) == ("10.0.0.5", "eth0", "route to a peer host")


def test_loopback_route_and_hostname_fall_through_to_an_error_naming_what_was_tried():
    with pytest.raises(NoReachableAddress) as err:
        choose({}, IFACES, multi_host=True, hostname_addr="127.0.1.1", routes=["127.0.0.1"])
    msg = str(err.value)
    assert "127.0.0.1 (route to a peer host: loopback)" in msg and "127.0.1.1 (hostname: loopback)" in msg
    assert "3 non-loopback: ambiguous" in msg and "CHECKFREE_SOCKET_IFNAME" in msg


def test_no_interface_but_loopback_is_an_error_across_hosts():
    with pytest.raises(NoReachableAddress, match="none non-loopback"):
        choose({}, {"lo": "127.0.0.1"}, multi_host=True, hostname_addr="127.0.1.1")


def test_hostname_then_the_only_non_loopback_interface():
    assert choose({}, IFACES, multi_host=True, hostname_addr="192.168.1.5").ifname == "ib0"
    c = choose({}, {"lo": "127.0.0.1", "ens5": "10.1.1.1"}, multi_host=True, hostname_addr="127.0.1.1")
    assert (c.addr, c.how) == ("10.1.1.1", "only non-loopback interface")


def test_single_host_keeps_loopback():
    c = choose({}, IFACES, multi_host=False, hostname_addr="127.0.1.1", routes=["10.0.0.5"])
    assert (c.addr, c.ifname) == ("127.0.0.1", "lo")


@pytest.mark.parametrize("var", netaddr.IFNAME_ENVS)
def test_interface_options_are_honoured(var):
    c = choose({var: "ib0"}, IFACES, multi_host=True, routes=["10.0.0.5"])
    assert (c.addr, c.ifname, c.how) == ("192.168.1.5", "ib0", f"{var}=ib0")


def test_own_option_wins_over_gloo_and_nccl():
    env = {"CHECKFREE_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "docker0"}
    assert choose(env, IFACES, multi_host=True).ifname == "eth0"
    del env["CHECKFREE_SOCKET_IFNAME"]
    assert choose(env, IFACES, multi_host=True).ifname == "ib0"


def test_nccl_syntax_prefix_exact_exclude():
    ifaces = {"lo": "127.0.0.1", "eth0": "10.0.0.5", "eth10": "10.9.0.5", "ib0": "192.168.1.5"}
    assert netaddr.ifname_matches("eth", ifaces) == ["eth0", "eth10"]
    assert netaddr.ifname_matches("=eth1", ifaces) == []
    assert netaddr.ifname_matches("=eth10", ifaces) == ["eth10"]
    assert netaddr.ifname_matches("^lo,eth", ifaces) == ["ib0"]
    assert netaddr.ifname_matches("eth0,ib", ifaces) == ["eth0", "ib0"]


def test_interface_option_naming_nothing_usable_is_an_error_not_a_guess():
    with pytest.raises(NoReachableAddress, match=r"GLOO_SOCKET_IFNAME='wlan0' selects no usable interface.*eth0=10\.0"):
        choose({"GLOO_SOCKET_IFNAME": "wlan0"}, IFACES, multi_host=True, routes=["10.0.0.5"])
    with pytest.raises(NoReachableAddress, match="rejected: 127.0.0.1"):
        choose({"NCCL_SOCKET_IFNAME": "lo"}, IFACES, multi_host=True)
    # on one host the loopback interface is a fine choice
    assert choose({"NCCL_SOCKET_IFNAME": "lo"}, IFACES, multi_host=False).addr == "127.0.0.1"


def test_explicit_address():
    c = choose({"CHECKFREE_ADVERTISE_ADDR": "10.0.0.5", "GLOO_SOCKET_IFNAME": "ib0"}, IFACES, multi_host=True)
    assert (c.addr, c.ifname, c.how) == ("10.0.0.5", "eth0", "CHECKFREE_ADVERTISE_ADDR")
    assert choose({"CHECKFREE_ADVERTISE_ADDR": "203.0.113.9"}, IFACES, multi_host=True).ifname is None  # NAT
    with pytest.raises(NoReachableAddress, match="loopback address, but the job spans hosts"):
        choose({"CHECKFREE_ADVERTISE_ADDR": "127.0.1.1"}, IFACES, multi_host=True)
    with pytest.raises(NoReachableAddress, match="not an IP address"):
        choose({"CHECKFREE_ADVERTISE_ADDR": "hostA"}, IFACES, multi_host=True)


def test_the_network_mpi_was_told_to_use():
    env = {"OMPI_MCA_btl_tcp_if_include": "192.168.0.0/16"}
    c = choose(env, IFACES, multi_host=True, routes=["10.0.0.5"])
    assert (c.addr, c.ifname) == ("192.168.1.5", "ib0")
    assert choose({"OMPI_MCA_btl_tcp_if_include": "eth0"}, IFACES, multi_host=True).ifname == "eth0"
    # DeepSpeed's default "eth0" where there is none: falls through to the route
    c = choose({"OMPI_MCA_btl_tcp_if_include": "eth0"}, {"lo": "127.0.0.1", "ens5": "10.1.1.1"},
               multi_host=True, routes=["10.1.1.1"])
    assert c.ifname == "ens5"


def test_route_sources_skip_addresses_every_host_has_and_rank_by_votes():
    routes = {"10.0.0.6": "10.0.0.5", "10.0.0.7": "10.0.0.5", "192.168.1.9": "192.168.1.5"}
    got = netaddr.route_sources(["172.17.0.1", "192.168.1.9", "10.0.0.6", "10.0.0.7", "127.0.0.1"],
                                set(IFACES.values()), routes.get)
    assert got == ["10.0.0.5", "192.168.1.5"]


def test_probes_on_this_machine():
    ifaces = netaddr.interfaces()
    assert ifaces.get("lo") == "127.0.0.1"
    assert netaddr.route_source("127.0.0.1") == "127.0.0.1"
    assert netaddr.choose_here({}, multi_host=False).addr == "127.0.0.1"
