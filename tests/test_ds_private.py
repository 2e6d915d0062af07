"""The private DeepSpeed surface, registered in one table (``ds_private.MEMBERS``), still
exists: on DeepSpeed's classes, on a real fp32 and a real bf16 engine (2-rank job), and every
DeepSpeed member the package's source touches is registered or public (a source scan); the
installed version is the tested one; the teardown of a dropped engine leaves any other
engine of the same process alone (real 2-rank job)."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, run_job, write_config

from ds_checkfree.pipe import ds_private

#: DeepSpeed members the package uses that are its documented API (deepspeed.readthedocs.io:
#: the engine, pipeline, comm and debugging pages) or torch's API DeepSpeed inherits
PUBLIC = {
    # deepspeed.comm (torch.distributed's API) and the deepspeed package
    "all_gather", "all_gather_object", "all_reduce", "barrier", "batch_isend_irecv", "broadcast",
    "broadcast_object_list", "destroy_process_group", "gather", "get_rank", "get_world_size", "irecv", "isend",
    "is_initialized", "recv", "send", "P2POp", "get_global_rank", "init_distributed", "ops", "pipe", "comm",
    "get_accelerator",
    "safe_get_full_fp32_param", "safe_set_full_fp32_param",
    # engines (DeepSpeedEngine / PipelineEngine documented methods and attributes)
    "train_batch", "eval_batch", "set_dataiterator", "is_first_stage", "is_last_stage", "forward", "backward",
    "save_checkpoint", "load_checkpoint", "bfloat16_enabled", "gradient_clipping", "train_batch_size",
    "train_micro_batch_size_per_gpu", "global_steps", "global_samples", "optimizer", "lr_scheduler", "module",
    "device", "DeepSpeedEngine", "PipelineEngine",
    # pipeline module, specs and schedules (deepspeed.pipe / deepspeed.runtime.pipe.schedule)
    "PipelineModule", "LayerSpec", "TiedLayerSpec", "topology", "PipeSchedule", "PipeInstruction",
    "BufferOpInstruction", "OptimizerStep", "ReduceGrads", "ReduceTiedGrads", "TrainSchedule", "steps",
    "num_pipe_buffers", "build", "micro_batches", "stages", "stage_id",
    # torch.nn.Module / torch.optim.Optimizer API on DeepSpeed's subclasses
    "eval", "train", "step", "state", "state_dict", "load_state_dict", "param_groups", "parameters",
    "named_parameters", "register_forward_hook", "training", "zero_grad", "to", "add_module",
}
#: names of DeepSpeed members that the package uses only on its own or other libraries' objects
NOT_DEEPSPEED = {
    "Optimizer",  # torch.optim.Optimizer
    "isfinite", "sqrt",  # math
    "wait",  # threading.Event
    "reset",  # StageRecoveryState.reset
    "backend",  # the data plane's backend name
    "world_size", "dp_rank", "micro_batch_size", "monitor", "stage",  # settings, the package's own objects
    "base_seed",  # CheckFreePipelineModule's / the model source's seed
    "config",  # a Hugging Face model's config
    "version",  # importlib.metadata.version
}
#: ``getattr(x, member, default)`` / ``hasattr(x, member)`` on a registered member, reviewed: here
#: absence is a legitimately different object, not a renamed member (file name, member) -> why
REVIEWED_DEFAULTS = {
    ("ds_private.py", "_backward_hook_managers"): "only the tensors DeepSpeed hooked carry it",
    ("ds_private.py", "default_pg_timeout"): "probed to raise a clear error before setting it",
    ("parts.py", "typename"): "an error message about an entry that is not a LayerSpec",
    ("sources.py", "typename"): "a display name in the run's metadata; a non-LayerSpec shows its type",
    ("sources.py", "parts"): "a model source's own parts() (duck typing), not PipelineModule.parts",
}
#: private members of other libraries (torch) the package uses; torch's c10d ones live in
#: ``ds_checkfree.elastic.c10d_private``
OTHER_PRIVATE = {"_foreach_norm", "_foreach_mul_", "_exit"}
_C10D_PRIVATE = "c10d_private.py"


def _package_files():
    return sorted(p for p in (ROOT / "ds_checkfree").rglob("*.py") if p.name != _C10D_PRIVATE)


def _by_name(node) -> str | None:
    """``getattr``/``hasattr``/``setattr`` calls name their attribute as a string constant."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr") \
            and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
        return str(node.args[1].value)
    return None


def _silent_defaults(tree) -> dict[str, int]:
    """Members read with a default (``getattr(x, "m", d)``) or probed (``hasattr(x, "m")``)."""
    found = {}
    for node in ast.walk(tree):
        name = _by_name(node)
        if name is not None and (node.func.id == "hasattr" or len(node.args) == 3):
            found.setdefault(name, node.lineno)
    return found


def _accessed(tree) -> dict[str, int]:
    """Attribute names read, written or overridden (methods of classes), names passed as strings
    to getattr/hasattr/setattr, and names imported from deepspeed, with a line of each."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.setdefault(node.attr, node.lineno)
        elif _by_name(node) is not None:
            names.setdefault(_by_name(node), node.lineno)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.setdefault(item.name, item.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspeed"):
            for alias in node.names:
                names.setdefault(alias.name, node.lineno)
    return names


def _defined_by_package(trees) -> set[str]:
    """Names the package defines itself: functions, classes, module globals, attributes it
    assigns on objects of its own (``self.x = ...`` in its classes)."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "__setattr__" \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                names.add(str(node.args[1].value))  # object.__setattr__(self, "_x", ...)
    return names


def _deepspeed_names() -> set[str]:
    """Every member of DeepSpeed's classes and modules that ``MEMBERS`` names as owners: class
    attributes and methods, attributes their constructors and methods assign, module globals."""
    names = set()
    for spec in {m.owner for m in ds_private.MEMBERS if m.owner.startswith("deepspeed")}:
        module_name, _, cls_name = spec.partition(":")
        owner = importlib.import_module(module_name)
        if not cls_name:
            names |= set(vars(owner))
            continue
        for cls in getattr(owner, cls_name).__mro__:
            if not cls.__module__.startswith("deepspeed"):
                continue
            names |= set(vars(cls))
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
                if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "self":
                    names.add(node.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def _registered() -> set[str]:
    return {part for m in ds_private.MEMBERS for part in m.name.split(".")}


def test_every_private_member_we_use_exists():
    assert ds_private.check_deepspeed_version() is None  # the installed DeepSpeed is a tested one
    assert ds_private.missing_members() == []
    assert set(m.on for m in ds_private.MEMBERS) <= set(ds_private.KINDS)
    ds_private.require_members()  # what an engine build runs: passes on the tested version


def test_missing_member_is_named_and_refuses_a_build(monkeypatch):
    gone = ds_private.Member("deepspeed.runtime.pipe.engine:PipelineEngine", "_no_such_hook", "class", "test")
    monkeypatch.setattr(ds_private, "MEMBERS", (gone,))
    assert ds_private.missing_members() == ["PipelineEngine._no_such_hook"]
    ds_private.require_members.cache_clear()
    with pytest.raises(RuntimeError, match=r"lacks PipelineEngine._no_such_hook, .*tested with deepspeed 0.19.8"):
        ds_private.require_members()
    ds_private.require_members.cache_clear()
    on_engine = ds_private.Member("deepspeed.runtime.pipe.engine:PipelineEngine", "a.b", "engine", "test")
    monkeypatch.setattr(ds_private, "MEMBERS", (on_engine,))

    class Obj:
        pass
    good, bad = Obj(), Obj()
    good.a, bad.a = Obj(), Obj()
    good.a.b = 1
    assert ds_private.missing_on({"engine": [good]}) == []
    assert ds_private.missing_on({"engine": [good, bad]}) == ["PipelineEngine.a.b (on the engine)"]
    assert ds_private.missing_on({"module": [bad]}) == []  # a kind not given is not checked


def test_layer_spec_members_exist():
    import torch
    from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec
    objects = {"layer spec": [LayerSpec(torch.nn.Linear, 2, 2)],
               "tied layer spec": [TiedLayerSpec("k", torch.nn.Linear, 2, 2)]}
    assert ds_private.missing_on(objects) == []


def test_every_deepspeed_member_the_package_touches_is_registered():
    """Scans the package's source: a DeepSpeed member (any name DeepSpeed's registered owners
    define) must be registered in ``MEMBERS`` or listed public above; a private name (``_x``)
    the package neither defines nor registers fails too, whoever owns it."""
    trees = {p: ast.parse(p.read_text()) for p in _package_files()}
    deepspeed_names, registered = _deepspeed_names(), _registered()
    ours = _defined_by_package(trees.values())
    assert not {n for n in PUBLIC | NOT_DEEPSPEED if n.startswith("_")}, "a private name is never public"
    unregistered = []
    for path, tree in trees.items():
        for name, line in _accessed(tree).items():
            if name in registered or name in PUBLIC or name in NOT_DEEPSPEED or name in OTHER_PRIVATE:
                continue
            private = name.startswith("_") and not name.startswith("__") and name not in ours
            if name in deepspeed_names or private:
                unregistered.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert unregistered == [], ("unregistered DeepSpeed (or private) members; add each to ds_private.MEMBERS "
                                "(or, if documented, to PUBLIC here): " + ", ".join(unregistered))


def test_no_registered_member_is_read_with_a_silent_default():
    """A renamed member must fail loudly: no ``getattr(x, member, default)`` or ``hasattr`` on a
    registered member (a bf16 norm would silently stay pre-clip, a hand-off drop the masters),
    except where absence is reviewed to mean another kind of object."""
    registered = _registered()
    silent = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in _package_files()
              for name, line in _silent_defaults(ast.parse(p.read_text())).items()
              if name in registered and (p.name, name) not in REVIEWED_DEFAULTS]
    assert silent == [], ("read these directly (an AttributeError names a renamed member), or decide by the "
                          "configuration: " + ", ".join(silent))


def test_the_scan_catches_an_unregistered_access(monkeypatch):
    """The scan is not vacuous: without its registration, a member the package uses is reported."""
    kept = tuple(m for m in ds_private.MEMBERS if m.name != "pipe_buffers")
    monkeypatch.setattr(ds_private, "MEMBERS", kept)
    with pytest.raises(AssertionError, match=r"ds_checkfree/pipe/engine.py:\d+: pipe_buffers"):
        test_every_deepspeed_member_the_package_touches_is_registered()


def test_a_version_outside_the_tested_range_warns_and_names_it():
    assert ds_private.check_deepspeed_version(ds_private.TESTED_DEEPSPEED[0]) is None
    with pytest.warns(RuntimeWarning, match=r"tested with deepspeed 0.19.8 but deepspeed 0.20.1 is installed"):
        ds_private.check_deepspeed_version("0.20.1")


@pytest.mark.parametrize("installed", [None, "0.20.1"])
def test_importing_the_package_checks_the_installed_version(installed):
    """In a fresh process: ``import ds_checkfree`` is silent on the installed (tested) DeepSpeed
    and warns, naming both versions, when the metadata says another one is installed."""
    fake = "" if installed is None else f"metadata.version = lambda name: {installed!r}"
    code = f"""if True:
        import warnings
        from importlib import metadata
        {fake}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ds_checkfree
        print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                         env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    caught = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    if installed is None:
        assert caught == []
    else:
        assert len(caught) == 1 and "tested with deepspeed 0.19.8 but deepspeed 0.20.1 is installed" in caught[0]


def test_registered_members_exist_on_real_fp32_and_bf16_engines(tmp_path):
    """Real 2-rank job, one fp32 and one bf16 engine each trained a step: every registered
    instance member exists on the objects it is used on; a forward's hook manager names its
    engine (the teardown relies on it)."""
    cfg = write_config(tmp_path / "ds.json", base="baseline.json", mode="off", num_stages=2)
    out = tmp_path / "members"
    run_job("torchrun", 2, "tests/workers/private_members_worker.py", [str(cfg), str(out)], timeout=300)
    ranks = [json.loads((tmp_path / f"members.rank{r}.json").read_text()) for r in range(2)]
    checked = set()
    for rank, (fp32, bf16) in enumerate(ranks):
        assert not fp32["bf16"] and bf16["bf16"] and bf16["optimizer"] == "BF16_Optimizer"
        for r in (fp32, bf16):
            assert r["missing"] == [], (rank, r)
            assert math.isfinite(r["loss"])
            assert r["hook_owner_is_engine"] is (True if rank == 0 else None)
            checked |= set(r["kinds"])
    instance_kinds = {m.on for m in ds_private.MEMBERS} - {"class", "lazy", "layer spec", "tied layer spec"}
    assert instance_kinds <= checked, instance_kinds - checked


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
    a rebuild), a smaller group is a group of its own, formed once however often it is asked
    for, DeepSpeed's ``new_group`` is restored afterwards, and an engine built that way (``elastic=True``) trains; with the data plane's
    abort flag set its next step raises before the optimizer step and changes no weight; an
    engine built for a recovery (``rebuilt=True``) skips DeepSpeed's start-up weight broadcast."""
    cfg = write_config(tmp_path / "ds.json", base="baseline.json", mode="off", num_stages=2)
    out = tmp_path / "result.json"
    run_job("torchrun", 2, "tests/workers/world_groups_worker.py", [str(cfg), str(out)], timeout=240)
    r = json.loads(out.read_text())
    assert r["everyone_is_world"] and not r["alone_is_world"] and r["alone_size"] == 1
    assert r["alone_again_is_alone"] is True
    # DeepSpeed broadcasts every parameter at start-up; a recovery's engine (rebuilt) sends none
    assert r["start_broadcasts"] == r["parameters"] > 0 and r["rebuilt_broadcasts"] == 0
    assert r["patched_inside"] and r["restored"]
    assert r["all_reduce"] == 3.0
    assert r["engine_world_groups"] == [True, True, True]  # the module's world, model-parallel and pipe groups
    assert r["engine_dp_group_is_world"] is False  # one rank per stage: a group of one
    built = r["build_seconds"]
    assert set(built) == {"module_s", "engine_s", "groups_s", "groups_cpu_s", "groups", "groups_kept"}
    assert all(v >= 0 for v in built.values())
    # forming the groups is part of the module's build; 2 stages, 1 replica: each stage's data-parallel
    # group of one is formed, every larger set of members is the default group
    assert built["groups_s"] <= built["module_s"] and built["groups"] == 2
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    abort = r["abort_check"]
    assert abort["raised"] and "aborted" in abort["raised"]
    assert abort["weights_unchanged"] is True and abort["steps_advanced"] == 0


def test_warm_up_pays_the_op_probe_before_any_group_exists():
    """A spare's warm-up (in a fresh process, as a spare is) probes DeepSpeed's op table, marks
    the unused shared-memory build off on CPU and imports what the first build would, so its
    first engine build inside a recovery pays none of it."""
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
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] == [False, False]  # nothing paid at import time: the warm-up does it
    assert r["probed"] and r["shm"] is False
    assert r["imported"] == [True, True, True]
