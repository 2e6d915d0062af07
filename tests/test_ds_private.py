"""The private DeepSpeed surface, listed in one module, still exists; the teardown of a
dropped engine leaves any other engine of the same process alone (real 2-rank job)."""
from __future__ import annotations

import json
import math

from conftest import run_job, write_config

from ds_checkfree import ds_private


def test_every_private_member_we_use_exists():
    import deepspeed
    assert deepspeed.__version__ == ds_private.DEEPSPEED_VERSION
    assert ds_private.missing_members() == []


def test_missing_member_is_named(monkeypatch):
    name = "deepspeed.runtime.pipe.engine:PipelineEngine._no_such_hook"
    monkeypatch.setattr(ds_private, "PRIVATE_MEMBERS", {name: "test"})
    assert ds_private.missing_members() == [name]


def test_release_engine_does_not_touch_another_engine(tmp_path):
    cfg = write_config(tmp_path / "ds.json", base="baseline.json", mode="off", num_stages=2)
    out = tmp_path / "result.json"
    run_job("torchrun", 2, "tests/workers/teardown_worker.py", [str(cfg), str(out)], timeout=240)
    r = json.loads(out.read_text())
    assert r["dropped_cleared"] is True
    assert r["kept_attrs"] > 50 and r["kept_grid_intact"] and r["kept_tied_comms"] and r["p2p_grid_is_kept"]
    assert len(r["kept_losses"]) == 2 and all(math.isfinite(x) for x in r["kept_losses"])
