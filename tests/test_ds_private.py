"""The private DeepSpeed surface, listed in one module, still exists; the teardown of a
dropped engine leaves any other engine of the same process alone (real 2-rank job)."""
from __future__ import annotations

import json
import math

from conftest import run_job, write_config

from ds_checkfree.pipe import ds_private


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


def test_world_sized_groups_are_the_default_group_in_an_elastic_build(tmp_path):
    """Real 2-rank gloo job: a group of every rank is the default group (no new connections on
    a rebuild), a smaller group is a group of its own, DeepSpeed's ``new_group`` is restored
    afterwards, and an engine built that way (``elastic=True``) trains; with the data plane's
    abort flag set its next step raises before the optimizer step and changes no weight."""
    cfg = write_config(tmp_path / "ds.json", base="baseline.json", mode="off", num_stages=2)
    out = tmp_path / "result.json"
    run_job("torchrun", 2, "tests/workers/world_groups_worker.py", [str(cfg), str(out)], timeout=240)
    r = json.loads(out.read_text())
    assert r["everyone_is_world"] and not r["alone_is_world"] and r["alone_size"] == 1
    assert r["patched_inside"] and r["restored"]
    assert r["all_reduce"] == 3.0
    assert r["engine_world_groups"] == [True, True, True]  # the module's world, model-parallel and pipe groups
    assert r["engine_dp_group_is_world"] is False  # one rank per stage: a group of one
    assert set(r["build_seconds"]) == {"module_s", "engine_s"} and all(v >= 0 for v in r["build_seconds"].values())
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    abort = r["abort_check"]
    assert abort["raised"] and "aborted" in abort["raised"]
    assert abort["weights_unchanged"] is True and abort["steps_advanced"] == 0


def test_warm_up_pays_the_op_probe_before_any_group_exists():
    """A spare's warm-up (in a fresh process, as a spare is) probes DeepSpeed's op table, marks
    the unused shared-memory build off on CPU and imports what the first build would, so its
    first engine build inside a recovery pays none of it."""
    import subprocess
    import sys
    code = """if True:
        import json, sys
        import deepspeed.ops
        before = "__compatible_ops__" in vars(deepspeed.ops), "deepspeed.module_inject.auto_ep_config" in sys.modules
        from ds_checkfree.initialize import warm_up_first_build
        warm_up_first_build()
        ops = vars(deepspeed.ops).get("__compatible_ops__")
        print(json.dumps({"before": before, "probed": ops is not None,
                          "shm": None if ops is None else ops.get("deepspeed_shm_comm"),
                          "imported": [m in sys.modules for m in ("deepspeed.module_inject.auto_ep_config",
                                                                   "deepspeed.runtime.pipe.engine",
                                                                   "ds_checkfree.pipe.engine")]}))
    """
    env = dict(__import__("os").environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] == [False, False]  # nothing paid at import time: the warm-up does it
    assert r["probed"] and r["shm"] is False
    assert r["imported"] == [True, True, True]
