"""The elastic data plane per backend: which plane an accelerator gets, the NCCL plane's
settings, and its way out of a generation (abort + forget, nothing shut down) on a real
2-rank gloo job that forms a second generation in the same processes."""
from __future__ import annotations

import json

import pytest
from conftest import run_job

from ds_checkfree.elastic import c10d_private
from ds_checkfree.elastic.data_plane import (NCCL_ENV, DataPlaneAborted, GlooPlane, NcclPlane, check_not_aborted,
                                     plane_for)


def test_each_accelerator_gets_its_plane():
    assert isinstance(plane_for("cpu"), GlooPlane) and plane_for("cpu").backend == "gloo"
    assert isinstance(plane_for("cuda"), NcclPlane) and plane_for("cuda").backend == "nccl"
    with pytest.raises(NotImplementedError, match="Fix: run the elastic launch with DS_ACCELERATOR=cpu or cuda"):
        plane_for("hpu")
    with pytest.raises(ValueError, match="no data-plane backend known"):
        plane_for("tpu")


def test_nccl_plane_sets_what_survival_needs_and_says_so(monkeypatch):
    for key in NCCL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # torch's default: tear the process down
    monkeypatch.delenv("TORCH_NCCL_NONBLOCKING_TIMEOUT", raising=False)
    lines = []
    NcclPlane(log=lines.append, timeout_s=29.5).prepare()
    import os
    assert {k: os.environ[k] for k in NCCL_ENV} == NCCL_ENV
    assert os.environ["TORCH_NCCL_NONBLOCKING_TIMEOUT"] == "30"  # not torch's 30 min
    assert len(lines) == 1 and "TORCH_NCCL_ASYNC_ERROR_HANDLING=0" in lines[0]
    NcclPlane(log=lines.append, timeout_s=29.5).prepare()  # already set: nothing to say
    assert len(lines) == 1


def test_a_step_after_an_nccl_abort_does_not_reach_the_optimizer(monkeypatch):
    """An aborted NCCL receive raises nothing: the abort's flag stops the step (the engine
    checks it before the optimizer step); gloo never sets it; the next generation clears it."""
    for key in (*NCCL_ENV, "TORCH_NCCL_NONBLOCKING_TIMEOUT"):
        monkeypatch.setenv(key, "x")
    plane = NcclPlane(log=lambda _: None)
    plane.prepare()
    check_not_aborted()
    GlooPlane().wake()
    check_not_aborted()
    plane.wake()  # no group registered here: only the flag
    with pytest.raises(DataPlaneAborted, match="not stepping"):
        check_not_aborted()
    assert isinstance(DataPlaneAborted("x"), RuntimeError)  # the elastic launch's data-plane errors
    plane.prepare()
    check_not_aborted()


def test_abort_errors_are_collected_not_raised():
    class Broken:
        group_name = "7"

        def abort(self):
            raise RuntimeError("peer gone")

    class Fine:
        aborted = False

        def abort(self):
            Fine.aborted = True

    assert c10d_private.abort_groups([Broken(), Fine()]) == ["7: RuntimeError: peer gone"]
    assert Fine.aborted


def test_private_c10d_members_exist():
    assert c10d_private.missing_members() == []


def test_forgotten_groups_are_not_shut_down_and_the_next_generation_forms(tmp_path):
    out = tmp_path / "result.json"
    run_job("torchrun", 2, "tests/workers/forget_groups_worker.py", [str(out)], timeout=180)
    r = json.loads(out.read_text())
    assert r["before"] == 2 and r["default_first"] and r["sub_registered"] and r["abort_errors"] == []
    assert r["forgotten"] == 2 and r["kept_are_old"]
    assert r["after_forget"] == {"initialized": False, "registered": 0}
    assert r["old_default_sum"] == 3.0  # the forgotten group was not shut down
    assert r["gen1_sum"] == 3.0 and r["gen1_subgroup_sum"] == 30.0
    assert r["gen1_registered"] == 2 and r["gen1_default_is_new"]


def test_a_missing_private_member_is_named(monkeypatch):
    monkeypatch.setattr(c10d_private, "PRIVATE_MEMBERS", {"_no_such_member": "test"})
    assert c10d_private.missing_members() == ["_no_such_member"]


def test_gloo_default_group_connects_a_pair_only_when_it_talks(tmp_path):
    """The elastic default group is formed without its N-1 connections per member (re-formed at
    every recovery, mostly unused): only ranks that talk over it connect; subgroups stay eager."""
    out = tmp_path / "lazy"
    run_job("torchrun", 3, "tests/workers/lazy_default_group_worker.py", [str(out)], timeout=180)
    r = [json.loads((tmp_path / f"lazy.{rank}.json").read_text()) for rank in range(3)]
    for seen in r:
        assert seen["env_before"] is None and seen["env_inside"] == "1" and seen["env_after"] is None
        # the eager subgroup connects to both peers (and listens); the lazy default group only listens
        assert seen["subgroup_sockets"] >= 2
        assert seen["default_group_sockets"] < seen["subgroup_sockets"]
        assert seen["default_all_reduce"] == 6.0 and seen["subgroup_all_reduce"] == 6.0
    assert r[1]["received"] == 1.0
    # the pair connected when it talked, and nobody connected to rank 2, which took no part:
    # pairs of ranks joined by a connection one of them opened or accepted meanwhile
    # (a socket counted alone could be another process connecting to a rank's listener)
    ports = [set(seen["local_ports"]) for seen in r]
    joined = {tuple(sorted((a, b))) for a in range(3) for b in range(3) if a != b
              for _, remote in r[a]["p2p_new_tcp"] if remote in ports[b]}
    assert joined == {(0, 1)}, joined
