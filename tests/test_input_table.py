"""The input tables walked entry by entry (issue #26, part 3).

Every flag of ``launch/train.py`` (``options.FLAGS``), every key of the ``checkfree`` section
(``checkfree.KEY_RULES``) and every cross-check (``options.CROSS_CHECKS``) gets bad values,
derived from its rule where the rule says enough (a range, a closed set, a path) and listed
here where it does not (a parser). Each must end in one ``ConfigError`` line that names it and
the fix, before any process group: in this process (fast, one test per value), and under
``deepspeed --num_gpus 4``, where the line must be printed once and every rank exit 2. The
second walks every value in one launch: this file is also the script the launcher starts
(``__main__`` below), running the real ``run_cli`` of ``launch/train.py`` per value with its
``main`` cut after the checks. Two more launches run ``launch/train.py`` itself on the two
inputs issue #26 measured (a corpus shorter than one step, an output directory that cannot
be created).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import traceback
from pathlib import Path

import pytest

from conftest import ROOT, run_job

from ds_checkfree.config.checkfree import KEY_RULES, CheckFreeConfig, _field_kinds
from ds_checkfree.config.inputs import (ConfigError, Delegated, HasCheckpoint, OneOf, Parses, Range, ReadableFile,
                                        WritableDir, WritableFile)
from ds_checkfree.config.options import CROSS_CHECKS, FLAGS, min_corpus_tokens

_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "launch" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

#: what ``main`` returns in the walker when every check passed (it stops before training)
PASSED = 99


class Paths:
    """The files the bad (and the good) values point at, under one folder."""

    def __init__(self, root: Path):
        self.root = root
        self.file = root / "a_file"            # a regular file: nothing can be created under it
        self.dir = root / "a_dir"              # an empty directory (no checkpoint in it)
        self.missing = root / "missing.json"
        self.corpus = root / "corpus.txt"      # enough for one step of the base run
        self.short = root / "short.txt"        # shorter than one step (issue #26)
        self.empty = root / "empty.txt"
        self.bad_yaml = root / "bad.yaml"
        self.small_vocab = root / "small_vocab.yaml"

    def create(self) -> Paths:
        self.root.mkdir(parents=True, exist_ok=True)
        self.file.write_text("x")
        self.dir.mkdir(exist_ok=True)
        self.corpus.write_text("the quick brown fox jumps over the lazy dog. " * 500)
        self.short.write_text("the quick brown fox jumps over the lazy dog. " * 20)
        self.empty.write_text("  \n")
        self.bad_yaml.write_text("d_model: [1, 2\n")
        tiny = (ROOT / "ds_checkfree/models/presets/tiny.yaml").read_text()
        self.small_vocab.write_text(tiny.replace("vocab_size: 256", "vocab_size: 100"))
        return self

    def base_argv(self, config: Path | None = None) -> list[str]:
        return ["--deepspeed_config", str(config or ROOT / "ds_configs/checkfree.json"), "--model", "tiny",
                "--steps", "2", "--data", str(self.corpus)]


# -- bad values: derived from the rule, or listed where a parser decides -----------------------

def _numbers_outside(rule: Range, integer: bool) -> list:
    out = []
    if rule.lo is not None:
        out.append(rule.lo if rule.lo_open else rule.lo - 1)
    if rule.hi is not None:
        out.append(rule.hi if rule.hi_open else rule.hi + 1)
    if not integer:
        out.append(math.nan)
    return [int(v) if integer else float(v) for v in out if not (integer and isinstance(v, float))]


def _outside(rule, paths: Paths, integer: bool) -> list:
    """Values that break ``rule`` (a Range, OneOf or path rule); [] for the others."""
    if isinstance(rule, Range):
        return _numbers_outside(rule, integer)
    if isinstance(rule, OneOf):
        return ["nope"]
    if isinstance(rule, ReadableFile):
        return [str(paths.missing), str(paths.dir)]
    if isinstance(rule, WritableDir):
        return [str(paths.file / "sub"), str(paths.file)]
    if isinstance(rule, WritableFile):
        return [str(paths.file / "sub.json"), str(paths.dir)]
    if isinstance(rule, HasCheckpoint):
        return [str(paths.dir)]
    return []


def _flag_examples(p: Paths) -> dict[str, list[list[str]]]:
    """Flags whose rule is a parser or lives elsewhere: bad argv fragments."""
    return {"--model": [["--model", "nope"], ["--model", str(p.bad_yaml)]],
            "--data": [["--data", str(p.missing)], ["--data", str(p.empty)]],
            "--fail_at": [["--fail_at", "2-100"], ["--fail_at", "1:0"], ["--fail_at", "9:3"]],
            "--coordinator": [["--coordinator", "nohost"], ["--coordinator", "h:0"]],
            "--join": [["--join", "1.2.3.4"]],
            "--fault_tolerant": [["--fault_tolerant"]],  # not under mpirun --with-ft ulfm
            "--spares": [["--spares", "1"]]}  # likewise


_CONFIG_EXAMPLES = {"fail_at": [["x:1"], [[1]], ["7:3"]]}

#: a bad value of the wrong JSON type, per annotated kind
_WRONG_TYPE = {"str": 3, "int": "3", "float": "x", "bool": 1, "list": "1:2"}


def flag_cases(p: Paths) -> list[tuple[str, list[str], str]]:
    """(id, argv after the base run's, text the error must contain) for every flag."""
    out = []
    examples = _flag_examples(p)
    for flag, entry in FLAGS.items():
        rule, _ = entry.rule()
        bad = [[flag, "x"]] if entry.kind in ("int", "float") else [[f"{flag}=1"]] if entry.kind == "flag" else []
        bad += [[flag, str(v)] for v in _outside(rule, p, entry.kind == "int")] if entry.kind != "append" else []
        bad += examples.get(flag, [])
        out += [(f"{flag}#{i}", argv, flag.lstrip("-")) for i, argv in enumerate(bad)]
    return out


def config_values(p: Paths) -> list[tuple[str, str, object]]:
    """(id, key, bad value) for every key of the checkfree section."""
    out = []
    for key, (rule, _) in KEY_RULES.items():
        kind = _field_kinds()[key][0]
        bad = [_WRONG_TYPE[kind]] + _outside(rule, p, kind == "int") + _CONFIG_EXAMPLES.get(key, [])
        out += [(f"checkfree.{key}#{i}", key, value) for i, value in enumerate(bad)]
    return out


def cross_cases(p: Paths) -> dict[str, tuple[list[str], str]]:
    return {"save_hf_needs_hf_model": (["--save_hf", str(p.dir)], "save_hf"),
            "seq_len_within_model": (["--seq_len", "65"], "seq_len"),
            "corpus_fits_one_step": (["--data", str(p.short)], "too few for one step"),
            "tokenizer_fits_model": (["--model", str(p.small_vocab)], "vocab_size 100")}


def all_cases(p: Paths) -> list[tuple[str, list[str], str]]:
    """Every case as (id, full argv, needle); config values become JSON files under ``p``."""
    out = [(cid, p.base_argv() + argv, needle) for cid, argv, needle in flag_cases(p)]
    base = json.loads((ROOT / "ds_configs/checkfree.json").read_text())
    for cid, key, value in config_values(p):
        cfg = json.loads(json.dumps(base))
        cfg["checkfree"][key] = value
        path = p.root / f"{cid.replace('#', '_')}.json"
        if p.root.exists():
            path.write_text(json.dumps(cfg))
        out.append((cid, p.base_argv(path), f"checkfree.{key}"))
    out += [(f"cross:{name}", p.base_argv() + argv, needle) for name, (argv, needle) in cross_cases(p).items()]
    return out


_IDS = [cid for cid, _, _ in all_cases(Paths(Path("/nonexistent")))]


# -- the tables are complete ---------------------------------------------------------------------

def _kind(action) -> str:
    if type(action).__name__ == "_StoreTrueAction":
        return "flag"
    if type(action).__name__ == "_AppendAction":
        return "append"
    return {int: "int", float: "float", None: "str"}[action.type]


def test_every_flag_of_the_parser_has_a_table_entry_of_its_kind():
    actions = {o: a for a in train.build_parser()._actions for o in a.option_strings if o not in ("-h", "--help")}
    assert set(actions) == set(FLAGS), "launch/train.py's flags and options.FLAGS differ: add the entry"
    for flag, action in actions.items():
        assert (_kind(action), action.dest) == (FLAGS[flag].kind, FLAGS[flag].attr(flag)), flag


def test_every_config_key_and_cross_check_has_a_rule_and_bad_values():
    assert set(KEY_RULES) == set(CheckFreeConfig.field_names())
    assert set(cross_cases(Paths(Path("/x")))) == set(CROSS_CHECKS)
    examples = _flag_examples(Paths(Path("/x")))
    for flag, entry in FLAGS.items():  # a parser or a check elsewhere: this file lists bad values
        if isinstance(entry.rule()[0], (Parses, Delegated)):
            assert examples.get(flag), f"{flag}: add bad values to _flag_examples"
    for key, (rule, _) in KEY_RULES.items():
        if isinstance(rule, (Parses, Delegated)):
            assert _CONFIG_EXAMPLES.get(key), f"checkfree.{key}: add bad values to _CONFIG_EXAMPLES"


# -- in this process: every bad value -----------------------------------------------------------

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return Paths(tmp_path_factory.mktemp("inputs")).create()


@pytest.fixture(scope="module")
def case_table(paths):
    return {cid: (argv, needle) for cid, argv, needle in all_cases(paths)}


@pytest.fixture
def four_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_the_base_run_passes_every_check(paths, four_ranks):
    """The control: without a bad value the checks pass (so each case below fails for its value)."""
    options, setup, elastic, _ = train.checked_start(train.parse_args(paths.base_argv()))
    assert setup.dp_size == 1 and not elastic and options.steps == 2


@pytest.mark.parametrize("case", _IDS)
def test_bad_value_ends_in_one_line_naming_it_before_any_process_group(case_table, four_ranks, case):
    import torch.distributed as dist
    argv, needle = case_table[case]
    with pytest.raises(ConfigError) as err:
        train.checked_start(train.parse_args(argv))
    message = str(err.value)
    assert needle in message and ("Fix: " in message or "did you mean" in message), message
    assert not dist.is_initialized()


@pytest.mark.parametrize("seq_len,micro,dp", [(64, 4, 1), (16, 2, 3), (5, 1, 2)])
def test_min_corpus_tokens_is_the_data_pipelines_own_minimum(tmp_path, seq_len, micro, dp):
    from ds_checkfree.data import build_data
    need = min_corpus_tokens(seq_len, micro, dp)
    for n, fits in ((need, True), (need - 1, False)):
        corpus = tmp_path / f"c{n}.txt"
        corpus.write_text("a" * n)
        try:
            build_data(str(corpus), seq_len, micro, dp_size=dp, max_val_batches=1)
            built = True
        except ValueError:
            built = False
        assert built is fits, (n, need)


def test_argparse_errors_are_one_line_with_the_fix():
    for argv, needles in ((["--deepspeed_config", "x", "--stpes", "3"], ["did you mean --steps"]),
                          ([], ["--deepspeed_config: required"]),
                          (["--deepspeed_config", "x", "--steps"], ["--steps: expected one argument", "positive"])):
        with pytest.raises(ConfigError) as err:
            train.parse_args(argv)
        assert "\n" not in str(err.value) and all(n in str(err.value) for n in needles), str(err.value)


# -- under deepspeed --num_gpus 4 ----------------------------------------------------------------

def test_every_bad_value_is_printed_once_under_the_deepspeed_launcher(paths):
    """One launch, every case: per case, one rank prints exactly one line, every rank returns 2."""
    cases = all_cases(paths)
    plan = paths.root / "walk.json"
    out = paths.root / "walk_out"
    out.mkdir(exist_ok=True)
    plan.write_text(json.dumps({"control": paths.base_argv(), "cases": cases, "out": str(out)}))
    run_job("deepspeed", 4, "tests/test_input_table.py", ["--walk", str(plan)], timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["control"] == {"code": PASSED, "output": ""} for r in ranks), [r["control"] for r in ranks]
    for cid, _, needle in cases:
        results = [r["cases"][cid] for r in ranks]
        assert [res["code"] for res in results] == [2] * 4, (cid, results)
        printed = [res["output"] for res in results if res["output"]]
        assert len(printed) == 1 and printed[0].count("\n") == 1, (cid, results)
        assert printed[0].startswith("configuration error: ") and needle in printed[0], (cid, printed)


@pytest.mark.parametrize("case", ["corpus_shorter_than_one_step", "output_dir_cannot_be_created"])
def test_issue_26_inputs_end_once_under_the_launcher(paths, case):
    """The two inputs measured in issue #26, through launch/train.py itself."""
    extra, needle = {"corpus_shorter_than_one_step": (["--data", str(paths.short)], "too few for one step"),
                     "output_dir_cannot_be_created": (["--output_dir", str(paths.file / "out")],
                                                      "cannot be created")}[case]
    proc = run_job("deepspeed", 4, "launch/train.py", paths.base_argv() + extra, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stdout.count("configuration error: ") == 1 and needle in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "Connection closed" not in proc.stdout


# -- the walker: this file as the script each rank runs -------------------------------------------

def _run_captured(argv: list[str]) -> dict:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = train.run_cli(argv)
    except BaseException:  # noqa: BLE001 - anything but a clean exit is what the test reports
        return {"code": None, "output": buf.getvalue() + traceback.format_exc()}
    return {"code": code, "output": buf.getvalue()}


def _walk(plan_path: str) -> None:
    """Each rank: the real ``run_cli`` per case, its ``main`` cut after every check (a case that
    passed them would otherwise start training)."""
    plan = json.loads(Path(plan_path).read_text())
    train.main = lambda argv=None: train.checked_start(train.parse_args(argv)) and PASSED
    train.run_cli(plan["control"])  # warm: first imports may log; the cases capture only their own output
    result = {"control": _run_captured(plan["control"]),
              "cases": {cid: _run_captured(argv) for cid, argv, _ in plan["cases"]}}
    Path(plan["out"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _walk(sys.argv[sys.argv.index("--walk") + 1])
