"""Config validation: every bad input fails early, naming the key and the value."""

import copy
import json

import pytest

from conftest import ROOT
from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError
from ds_checkfree.config.deepspeed_checks import micro_batches_per_step, split_deepspeed_config, validate_world
from ds_checkfree.initialize import prepare

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}


def raises(*needles):
    """Context manager: ConfigError whose message contains every needle."""

    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(ConfigError)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self._cm.__exit__(*exc)
            msg = str(self.info.value)
            for n in needles:
                assert n in msg, f"{n!r} not in {msg!r}"
            assert "Fix:" in msg, msg
            return out

    return _Ctx()


# -- defaults and round trip ------------------------------------------------------------

def test_defaults_valid():
    cfg = CheckFreeConfig()
    assert cfg.mode == "checkfree" and cfg.num_stages == 4 and cfg.lr_scale == 1.1
    assert cfg.fail_at == [] and cfg.recovery_method == "weighted_average"
    assert CheckFreeConfig.from_dict({}) == cfg
    assert validate_world(cfg, world_size=4, num_layers=8, micro_batches=4) == 1


def test_round_trip(tmp_path):
    sched = tmp_path / "sched.json"
    sched.write_text("[]")
    cfg = CheckFreeConfig.from_dict({
        "mode": "checkfree_plus", "num_stages": 6, "swap": False, "lr_scale": 1.2,
        "grad_norm": "pre_clip", "recovery_method": "copy_prev",
        "fail_at": ["3:20", [1, 5], " 2 : 7 "], "failure_rate": 10, "assumed_step_seconds": 2,
        "failure_seed": 7, "failure_schedule": str(sched), "spares": 2,
        "checkpoint_every": 50, "checkpoint_dir": str(tmp_path), "storage_bandwidth_mb_s": 500,
    })
    assert cfg.fail_at == [(1, 5), (2, 7), (3, 20)]
    assert isinstance(cfg.failure_rate, float) and isinstance(cfg.assumed_step_seconds, float)
    d = cfg.to_dict()
    assert d["fail_at"] == ["1:5", "2:7", "3:20"]
    d2 = json.loads(json.dumps(d))
    assert CheckFreeConfig.from_dict(d2) == cfg


# -- bad fields -------------------------------------------------------------------------

def test_unknown_key_suggests_closest():
    with raises("checkfree.lr_scal", "unknown key", '"lr_scale"', "recovery_method"):
        CheckFreeConfig.from_dict({"lr_scal": 1.1})


@pytest.mark.parametrize("key,value,expected", [
    ("num_stages", True, "integer"),
    ("num_stages", 4.0, "integer"),
    ("lr_scale", False, "number"),
    ("lr_scale", "1.1", "number"),
    ("swap", 1, "bool"),
    ("mode", 3, "string"),
    ("spares", "0", "integer"),
    ("assumed_step_seconds", True, "number"),
])
def test_wrong_type(key, value, expected):
    with raises(f"checkfree.{key}", repr(value), expected):
        CheckFreeConfig.from_dict({key: value})


def test_int_accepted_for_float():
    cfg = CheckFreeConfig.from_dict({"lr_scale": 2, "heartbeat_interval_s": 1})
    assert cfg.lr_scale == 2.0 and isinstance(cfg.lr_scale, float)


@pytest.mark.parametrize("key,value", [
    ("lr_scale", -1.0), ("lr_scale", 0), ("epsilon", 0.0), ("heartbeat_interval_s", -0.5),
    ("storage_bandwidth_mb_s", 0), ("assumed_step_seconds", -2.0),
])
def test_must_be_positive(key, value):
    with raises(f"checkfree.{key}", repr(float(value)), "> 0"):
        CheckFreeConfig.from_dict({key: value})


def test_lr_scale_message_format():
    with pytest.raises(ConfigError) as e:
        CheckFreeConfig(lr_scale=-1.0)
    assert str(e.value).startswith("checkfree.lr_scale = -1.0: must be > 0. Fix: ")


@pytest.mark.parametrize("key,value", [("spares", -1), ("checkpoint_every", -5)])
def test_must_be_non_negative(key, value):
    with raises(f"checkfree.{key}", str(value), ">= 0"):
        CheckFreeConfig.from_dict({key: value})


@pytest.mark.parametrize("key", ["data_plane_timeout_s", "heartbeat_interval_s"])
def test_timeouts_must_be_positive(key):
    with raises(f"checkfree.{key}", "0", "> 0"):
        CheckFreeConfig.from_dict({key: 0.0})


def test_norm_scope_is_checked():
    with raises("checkfree.norm_scope", "layers", "must be one of"):
        CheckFreeConfig.from_dict({"norm_scope": "layers"})


@pytest.mark.parametrize("key,value", [
    ("mode", "checkfree+"), ("grad_norm", "clip"), ("recovery_method", "avg"),
])
def test_bad_choice(key, value):
    with raises(f"checkfree.{key}", repr(value), "must be one of"):
        CheckFreeConfig.from_dict({key: value})


@pytest.mark.parametrize("mode,minimum", [("off", 1), ("checkfree", 3), ("checkfree_plus", 4)])
def test_too_few_stages(mode, minimum):
    CheckFreeConfig(mode=mode, num_stages=minimum)  # the minimum itself is fine
    with raises("checkfree.num_stages", str(minimum - 1), f">= {minimum}", mode):
        CheckFreeConfig(mode=mode, num_stages=minimum - 1)


@pytest.mark.parametrize("entry,needle", [
    ("2-100", "STAGE:STEP"), ("a:3", "STAGE:STEP"), ("1:2:3", "STAGE:STEP"),
    ([1], "pair"), ([1, 2.5], "pair"), ([True, 3], "pair"), (5, "int"),
    ("-1:3", "negative"), ("1:0", "step 0"),
])
def test_fail_at_malformed(entry, needle):
    with raises("checkfree.fail_at[1]", repr(entry), needle):
        CheckFreeConfig.from_dict({"fail_at": ["0:1", entry]})


def test_fail_at_not_a_list():
    with raises("checkfree.fail_at", "'1:2'", "list"):
        CheckFreeConfig.from_dict({"fail_at": "1:2"})


def test_fail_at_stage_out_of_range():
    with raises("checkfree.fail_at", "'4:10'", "num_stages = 4", "0..3"):
        CheckFreeConfig(num_stages=4, fail_at=["4:10"])


@pytest.mark.parametrize("rate", [-1, 100, 150.0])
def test_failure_rate_range(rate):
    with raises("checkfree.failure_rate", repr(float(rate))):
        CheckFreeConfig(failure_rate=rate, assumed_step_seconds=1.0)


def test_failure_rate_needs_step_seconds():
    with raises("checkfree.assumed_step_seconds", "None", "failure_rate = 5.0"):
        CheckFreeConfig(failure_rate=5)
    assert CheckFreeConfig(failure_rate=5, assumed_step_seconds=2.0).failure_rate == 5.0


def test_failure_schedule_must_exist(tmp_path):
    missing = str(tmp_path / "nope.json")
    with raises("checkfree.failure_schedule", repr(missing), "not found"):
        CheckFreeConfig(failure_schedule=missing)


def test_heartbeat_timeout_too_small():
    with raises("checkfree.heartbeat_timeout_s", "1.0", "2 * heartbeat_interval_s"):
        CheckFreeConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0)
    CheckFreeConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=1.01)


def test_checkpoint_every_needs_dir():
    with raises("checkfree.checkpoint_dir", "None", "checkpoint_every = 10"):
        CheckFreeConfig(checkpoint_every=10)


def test_swap_false_allowed_for_other_modes():
    assert CheckFreeConfig(mode="checkfree", swap=False).swap is False


# -- world shape --------------------------------------------------------------------------

def test_validate_world_returns_dp():
    assert validate_world(CheckFreeConfig(spares=1), world_size=9, num_layers=8, micro_batches=2) == 2


def test_stages_do_not_divide_world():
    with raises("checkfree.num_stages", "4", "world size 6", "spares 0", "[3, 6]"):
        validate_world(CheckFreeConfig(num_stages=4), world_size=6, num_layers=8, micro_batches=4)


def test_spares_leave_no_ranks():
    with raises("checkfree.spares", "4", "world size 4"):
        validate_world(CheckFreeConfig(spares=4), world_size=4, num_layers=8, micro_batches=4)


def test_fewer_layers_than_stages():
    with raises("num_layers", "3", "4"):
        validate_world(CheckFreeConfig(mode="off"), world_size=4, num_layers=3, micro_batches=4)


def test_layers_not_divisible():
    with raises("num_layers", "10", "same number of decoder layers", "8 or 12"):
        validate_world(CheckFreeConfig(), world_size=4, num_layers=10, micro_batches=4)
    # stock DeepSpeed partitions unevenly without complaint
    assert validate_world(CheckFreeConfig(mode="off"), world_size=4, num_layers=10, micro_batches=1) == 1


def test_checkfree_plus_needs_two_micro_batches():
    cfg = CheckFreeConfig(mode="checkfree_plus")
    with raises("gradient_accumulation_steps", "1", "swapped"):
        validate_world(cfg, world_size=4, num_layers=8, micro_batches=1)
    assert validate_world(cfg, world_size=4, num_layers=8, micro_batches=2) == 1
    no_swap = CheckFreeConfig(mode="checkfree_plus", swap=False)
    assert validate_world(no_swap, world_size=4, num_layers=8, micro_batches=1) == 1


def test_validate_world_rechecks_fail_at():
    cfg = CheckFreeConfig(fail_at=["3:1"])
    cfg.num_stages = 3  # mutated after construction
    with raises("checkfree.fail_at", "'3:1'"):
        validate_world(cfg, world_size=3, num_layers=6, micro_batches=2)


# -- the DeepSpeed side ---------------------------------------------------------------------

def test_split_does_not_mutate_caller():
    src = {**DS, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "checkfree": {"mode": "checkfree", "fail_at": ["1:3"]}}
    before = copy.deepcopy(src)
    ds, cfg = split_deepspeed_config(src)
    assert src == before
    assert "checkfree" not in ds and cfg.fail_at == [(1, 3)]
    ds["optimizer"]["params"]["lr"] = 5.0
    assert src["optimizer"]["params"]["lr"] == 1e-3


def test_split_missing_section_is_off():
    ds, cfg = split_deepspeed_config(dict(DS))
    assert cfg.mode == "off" and ds == DS


def test_split_from_path(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({**DS, "checkfree": {"mode": "checkfree_plus"}}))
    ds, cfg = split_deepspeed_config(p)
    assert cfg.mode == "checkfree_plus" and ds == DS
    ds, cfg = split_deepspeed_config(str(p))
    assert cfg.mode == "checkfree_plus"


def test_missing_micro_batch_size():
    with raises("train_micro_batch_size_per_gpu", "<missing>"):
        split_deepspeed_config({"train_batch_size": 8})


@pytest.mark.parametrize("key,value", [
    ("train_micro_batch_size_per_gpu", 0), ("train_micro_batch_size_per_gpu", True),
    ("train_batch_size", -8), ("gradient_accumulation_steps", "4"),
])
def test_bad_deepspeed_ints(key, value):
    with raises(key, repr(value), "positive integer") as info:
        split_deepspeed_config({**DS, key: value})
    assert "checkfree." not in str(info.value)


def test_bad_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "train_micro_batch_size_per_gpu": 2,\n  "x": }\n')
    with raises(str(p), "line 3", "column"):
        split_deepspeed_config(p)


def test_missing_file(tmp_path):
    p = tmp_path / "absent.json"
    with raises(str(p), "not found"):
        split_deepspeed_config(p)


def test_bad_section_inside_file(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({**DS, "checkfree": {"num_stage": 4}}))
    with raises("checkfree.num_stage", '"num_stages"'):
        split_deepspeed_config(p)


# -- micro-batches ---------------------------------------------------------------------------

def test_micro_batches_per_step():
    assert micro_batches_per_step({"train_micro_batch_size_per_gpu": 2}, 1) == 1
    assert micro_batches_per_step({"train_micro_batch_size_per_gpu": 2,
                                   "gradient_accumulation_steps": 4}, 3) == 4
    assert micro_batches_per_step({"train_micro_batch_size_per_gpu": 2,
                                   "train_batch_size": 24}, 3) == 4
    assert micro_batches_per_step({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 24,
                                   "gradient_accumulation_steps": 4}, 3) == 4


def test_micro_batches_not_divisible():
    with raises("train_batch_size", "10", "(2)", "(2)", "4"):
        micro_batches_per_step({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 10}, 2)


def test_micro_batches_disagree():
    with raises("train_batch_size", "16", "24"):
        micro_batches_per_step({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 16,
                                "gradient_accumulation_steps": 4}, 3)


@pytest.mark.parametrize("base", ["checkfree.json", "checkfree_plus.json", "redundant.json"])
@pytest.mark.parametrize("precision", [{}, {"bf16": {"enabled": True}}])
def test_zero_with_recovery_is_refused_naming_the_fix(base, precision):
    """ZeRO keeps its own fp32 copy of the weights, which recovery does not write (a rebuilt
    stage would be overwritten at the next step): refused for every recovery mode, fp32 or bf16;
    the stock and checkpoint runs (mode "off") keep it."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg.update(precision, zero_optimization={"stage": 1})
    with pytest.raises(ConfigError) as err:
        prepare(cfg, world_size=4)
    text = str(err.value)
    assert f"zero_optimization.stage = 1 with checkfree.mode = {cfg['checkfree']['mode']!r}" in text
    assert "overwrite the rebuilt stage" in text and "Fix: set zero_optimization.stage to 0" in text
    cfg["checkfree"]["mode"] = "off"
    assert prepare(cfg, world_size=4).checkfree.mode == "off"


@pytest.mark.parametrize("base", ["checkfree.json", "checkfree_plus.json", "redundant.json", "baseline.json"])
def test_activation_checkpoint_interval_is_refused_not_dropped(base):
    """The pipeline module is built without DeepSpeed's activation checkpointing in every mode:
    a non-zero interval is refused at start-up instead of silently ignored; 0 stays accepted."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg["pipeline"] = {"activation_checkpoint_interval": 1}
    with raises("pipeline.activation_checkpoint_interval = 1", "set it to 0"):
        prepare(cfg, world_size=4)
    cfg["pipeline"] = {"activation_checkpoint_interval": 0}
    assert prepare(cfg, world_size=4).checkfree.mode == cfg.get("checkfree", {}).get("mode", "off")
