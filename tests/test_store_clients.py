"""The next generation's store client, opened ahead (``ds_checkfree.elastic.store_clients``),
against a real TCPStore server in another process: taken alive with its sockets named, and
refused when its connection was shut meanwhile, when it was opened for another address, or
when the generation it was opened under is gone."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as tdist

from ds_checkfree.elastic.plane_sockets import shutdown_new_sockets, socket_inodes
from ds_checkfree.elastic.store_clients import NextStoreClient
from ds_checkfree.testing import free_port

SERVER = """if True:
    import sys, time
    from datetime import timedelta
    import torch.distributed as d
    store = d.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False,
                       timeout=timedelta(seconds=30))
    print("up", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def store_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield ("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait()


def open_client(host, port):
    return tdist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)


def test_a_client_opened_ahead_is_taken_alive_once_with_its_sockets(store_server):
    kept = []
    ahead = NextStoreClient(open_client, lambda inodes, token: kept.append((inodes, token)) or True)
    opening = ahead.prepare(store_server, token=3)
    assert opening is not None
    opening.join(30)
    assert ahead.prepare(store_server, token=3) is None  # one is ready for this address
    got = ahead.take(store_server)
    assert got is not None
    client, inodes = got
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert kept == [(inodes, 3)] and inodes and inodes <= set(socket_inodes().values())
    assert ahead.take(store_server) is None  # handed over once


def test_a_client_shut_meanwhile_another_address_or_a_gone_generation_is_not_taken(store_server):
    kept = []
    ahead = NextStoreClient(open_client, lambda inodes, token: kept.append(inodes) or True)
    ahead.prepare(store_server).join(30)
    others = set(socket_inodes().values())
    # a round's wake shut the client's socket before the next generation took it
    assert shutdown_new_sockets(others - kept[-1]) >= 1
    assert ahead.take(store_server) is None
    # opened for another coordinator (a failover moved the store)
    ahead.prepare(store_server).join(30)
    assert ahead.take((store_server[0], store_server[1] + 1)) is None
    # the generation it was opened under ended while it opened: dropped, never handed out
    gone = NextStoreClient(open_client, lambda inodes, token: False)
    gone.prepare(store_server, token=1).join(30)
    assert gone.take(store_server) is None
    # the server unreachable: nothing ready, and a later prepare may try again
    down = NextStoreClient(lambda h, p: tdist.TCPStore(h, p, is_master=False, timeout=timedelta(seconds=1),
                                                      wait_for_workers=False), lambda inodes, token: True)
    down.prepare(("127.0.0.1", free_port())).join(60)
    assert down.take(("127.0.0.1", 1)) is None
    again = down.prepare(store_server)  # a later prepare tries again
    assert again is not None
    down.close()  # waits for the opening (a thread inside torch's connect at exit aborts the process)
    assert not again.is_alive() and down.take(store_server) is None
