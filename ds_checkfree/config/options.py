"""The run's command-line options: one typed object, and one table of every flag's rule.

``launch/train.py`` parses its flags into ``TrainOptions`` once; the trainer reads only this
object (never an argparse namespace). ``FLAGS`` says, for every flag, what its value must
meet (a range, a path that must exist or be creatable, a parser) and the fix to print;
``check_inputs`` checks the flags from it and ``check_run`` the cross-checks with the
validated configuration (the corpus against one step, ``--seq_len`` against the model),
all before any process group starts, so a bad input ends in one line with exit status 2,
not in a traceback from every rank.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from dataclasses import dataclass

from ds_checkfree.config.checkfree import KEY_RULES, parse_fail_entry
from ds_checkfree.config.inputs import (ConfigError, Constraint, Delegated, HasCheckpoint, Invalid, Parses, Range,
                                        ReadableFile, WritableDir, WritableFile, check_value, fail)


@dataclass
class TrainOptions:
    """What a run was asked to do besides the DeepSpeed JSON (see ``launch/train.py --help``)."""
    model: str = "tiny"
    steps: int = 100
    seed: int = 0
    eval_every: int = 10
    eval_batches: int = 4
    local_rank: int = 0
    no_heartbeat: bool = False
    #: benchmark: heartbeats only in alternate wall-clock windows (heartbeat.monitor.ab_window_active)
    heartbeat_ab_window_s: float | None = None
    # optional inputs and outputs
    num_layers: int | None = None
    seq_len: int | None = None
    data: str | None = None
    output_dir: str | None = None
    #: write the trained model as a Hugging Face directory here (default for an hf: model:
    #: OUTPUT_DIR/hf)
    save_hf: str | None = None
    save_failure_schedule: str | None = None
    resume_from: str | None = None
    dump_recovery_dir: str | None = None
    #: the elastic job's coordinator, HOST:PORT (``--coordinator`` / ``--join``)
    coordinator: str | None = None
    #: wall-clock time the process started (restart costs include the imports)
    process_started_at: float | None = None

    @classmethod
    def from_namespace(cls, ns, **extra) -> TrainOptions:
        """Take the fields this class names from an argparse namespace."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names}, **extra)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 10.0.0.5:29400")
    return host.strip("[]"), int(port)


def _address(text: str) -> None:
    try:
        _, port = parse_address(text)
    except ValueError:
        raise Invalid("expected HOST:PORT") from None
    if not 0 < port < 65536:
        raise Invalid(f"port {port} is outside 1..65535")


def _corpus_source(source: str) -> None:
    from ds_checkfree.data.corpus import check_source
    check_source(source)


@dataclass(frozen=True)
class Flag:
    """One flag of ``launch/train.py``: how argparse reads it, what its value must meet, the fix."""
    #: "int", "float", "str", "flag" (store_true) or "append" (repeatable str)
    kind: str
    constraint: Constraint | None = None
    fix: str = ""
    #: the namespace attribute, when it is not the flag's name
    dest: str | None = None
    #: the value is merged into ``checkfree.<key>``: that key's rule (``KEY_RULES``) applies
    config_key: str | None = None

    def attr(self, flag: str) -> str:
        return self.dest or flag.lstrip("-")

    def rule(self) -> tuple[Constraint | None, str]:
        if self.config_key is not None and self.constraint is None:
            return KEY_RULES[self.config_key]
        return self.constraint, self.fix


_ADDRESS_FIX = "pass the address the job printed, e.g. 10.0.0.5:29400"

#: every flag of ``launch/train.py`` (``tests/test_input_table.py`` compares this with its parser).
#: ``check_inputs`` checks each value against its rule; what needs the configuration as well
#: (the corpus against one step, ``--seq_len`` against the model) is in ``CROSS_CHECKS``.
FLAGS: dict[str, Flag] = {
    # its content: ``launch/train.py`` (JSON) and ``initialize.prepare`` (every key)
    "--deepspeed_config": Flag("str", ReadableFile(), "pass a DeepSpeed JSON such as ds_configs/checkfree.json"),
    "--model": Flag("str", Delegated("ds_checkfree.initialize.prepare loads the preset or YAML"),
                    "pass a preset name (tiny, small, 124m, 500m, 1.5b), the path of a model YAML, or hf:DIR "
                    "(a local Hugging Face Llama/Mistral/Qwen2/GPT-2 directory)"),
    "--num_layers": Flag("int", Range(1), "pass a layer count the decoder stages divide evenly, or leave it out"),
    "--steps": Flag("int", Range(1), "pass a positive number of steps"),
    "--output_dir": Flag("str", WritableDir(), "pass a directory this user can create or write to"),
    "--save_hf": Flag("str", WritableDir(), "pass a directory this user can create or write to"),
    "--seed": Flag("int", Range(0, 2 ** 63), "use an integer >= 0"),
    "--data": Flag("str", Parses(_corpus_source),
                   "use 'shakespeare', a .txt file, a directory of .txt files, or hf:PATH[#column]"),
    "--seq_len": Flag("int", Range(2), "use e.g. 64 (at most the model's max_seq_len), or leave it out"),
    "--eval_every": Flag("int", Range(0), "use a positive number (0 validates only at the end)"),
    "--eval_batches": Flag("int", Range(1), "use a positive number of validation micro-batches"),
    "--fail_at": Flag("append", Parses(parse_fail_entry), config_key="fail_at"),
    "--failure_rate": Flag("float", config_key="failure_rate"),
    "--assumed_step_seconds": Flag("float", config_key="assumed_step_seconds"),
    "--failure_seed": Flag("int", config_key="failure_seed"),
    "--failure_schedule": Flag("str", config_key="failure_schedule"),
    "--save_failure_schedule": Flag("str", WritableFile(), "pass a file path this user can create or write"),
    # > 0 needs the MPI fault-tolerant launch: checked in launch/train.py
    "--spares": Flag("int", config_key="spares"),
    "--fault_tolerant": Flag("flag", Delegated("launch/train.py: only under mpirun --with-ft ulfm, or with --join"),
                             "launch with mpirun --with-ft ulfm -n <stages+spares> python launch/train.py ..."),
    "--coordinator": Flag("str", Parses(_address), _ADDRESS_FIX),
    "--join": Flag("str", Parses(_address), _ADDRESS_FIX, dest="coordinator"),
    "--resume_from": Flag("str", HasCheckpoint(), "pass the checkpoint_dir of an earlier run"),
    "--no_heartbeat": Flag("flag", fix="give --no_heartbeat without a value"),
    "--heartbeat_ab_window_s": Flag("float", Range(0, lo_open=True), "use e.g. 1.5 (seconds) or leave it out"),
    "--dump_recovery_dir": Flag("str", WritableDir(), "pass a directory this user can create or write to"),
    "--local_rank": Flag("int", Range(0), "leave it to the launcher (it sets LOCAL_RANK)"),
}


def _unknown_flag(message: str) -> str:
    words = message.split(": ", 1)[1].split()
    given = next((w.split("=")[0] for w in words if w.startswith("-")), words[0] if words else "")
    close = difflib.get_close_matches(given, list(FLAGS), n=1)
    return f"{message}. Fix: {'did you mean ' + close[0] + '? ' if close else ''}See launch/train.py --help."


def flag_error(message: str) -> str:
    """argparse's error message as one line that names the fix from ``FLAGS``."""
    named = re.match(r"argument (\S+): (.*)", message)
    if named:
        flags = named.group(1).split("/")
        entry = next((FLAGS[f] for f in flags if f in FLAGS), None)
        fix = entry.rule()[1] if entry is not None else "see launch/train.py --help"
        return f"{flags[0]}: {named.group(2)}. Fix: {fix}."
    if message.startswith("unrecognized arguments: "):
        return _unknown_flag(message)
    if message.startswith("the following arguments are required: "):
        flags = message.split(": ", 1)[1].split(", ")
        fixes = "; ".join(FLAGS[f].rule()[1] for f in flags if f in FLAGS)
        return f"{', '.join(flags)}: required. Fix: {fixes or 'see launch/train.py --help'}."
    return f"{message}. Fix: see launch/train.py --help."


class CheckedParser(argparse.ArgumentParser):
    """argparse whose errors are ``ConfigError``s: one line naming the fix, which the launch
    prints once, instead of a usage text from every rank."""

    def error(self, message: str):
        raise ConfigError(" ".join(flag_error(message).split()))


def check_inputs(args) -> None:
    """Every flag's value against its rule in ``FLAGS``, before any process group. ``args``:
    the parsed namespace (a ``TrainOptions`` checks the flags it holds)."""
    done = set()
    for flag, entry in FLAGS.items():
        attr = entry.attr(flag)
        if attr in done:
            continue
        done.add(attr)
        value = getattr(args, attr, None)
        label = "/".join(f for f, e in FLAGS.items() if e.attr(f) == attr)
        constraint, fix = entry.rule()
        for item in (value or []) if entry.kind == "append" else [value]:
            if item is not None and item is not False and item != "":
                check_value(label, item, constraint, fix)


# -- what the flags and the validated configuration can get wrong together -------------------

def _seq_len(options: TrainOptions, setup) -> int:
    return options.seq_len or setup.model.max_seq_len


def _data(options: TrainOptions, setup):
    """The run's data, built as the trainer builds it (``build_data`` is memoised: with one
    data-parallel replica the trainer's own call finds it built)."""
    from ds_checkfree.data import build_data
    return build_data(options.data, _seq_len(options, setup), setup.ds_config["train_micro_batch_size_per_gpu"],
                      seed=options.seed, dp_rank=0, dp_size=setup.dp_size, max_val_batches=options.eval_batches,
                      tokenizer=getattr(setup.model, "tokenizer", None))


def min_corpus_tokens(seq_len: int, micro: int, dp: int) -> int:
    """The fewest tokens from which ``build_data`` cuts one training step (``dp`` x ``micro``
    windows of ``seq_len`` + 1) and one validation batch from its held-out tail: found with
    the data pipeline's own split and windowing, so it cannot drift from them."""
    import inspect

    import torch

    from ds_checkfree.data.batches import MicroBatches, build_data, split_tokens, validation_batches
    fraction = inspect.signature(build_data).parameters["val_fraction"].default

    def fits(n: int) -> bool:
        try:
            splits = split_tokens(torch.zeros(n, dtype=torch.uint8), fraction)
            MicroBatches(splits.train, seq_len, micro, dp_size=dp)
            validation_batches(splits.val, seq_len, micro, 1)
        except ValueError:
            return False
        return True

    lo, hi = 1, 2
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(hi), not fits(lo): more tokens never hurt
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _seq_len_within_model(options: TrainOptions, setup) -> None:
    limit = setup.model.max_seq_len
    if options.seq_len is not None and options.seq_len > limit:
        raise fail("--seq_len", options.seq_len, f"longer than the model's max_seq_len ({limit})",
                   f"use --seq_len <= {limit}, or a model with a larger max_seq_len")


def _corpus_fits_one_step(options: TrainOptions, setup) -> None:
    try:
        _data(options, setup)
    except ValueError:
        from ds_checkfree.data import load_corpus, make_tokenizer
        seq_len, micro = _seq_len(options, setup), setup.ds_config["train_micro_batch_size_per_gpu"]
        have = len(make_tokenizer(getattr(setup.model, "tokenizer", None)).encode(load_corpus(options.data)))
        need = min_corpus_tokens(seq_len, micro, setup.dp_size)
        raise fail("--data", options.data or "shakespeare", f"{have} tokens, too few for one step: "
                   f"{setup.dp_size} replica(s) x {micro} sequences of {seq_len} tokens, and one validation batch "
                   f"from the held-out tail, need at least {need}", "use a larger corpus, or a smaller --seq_len "
                   f"(now {seq_len}) or train_micro_batch_size_per_gpu (now {micro})") from None


def _tokenizer_fits_model(options: TrainOptions, setup) -> None:
    vocab = _data(options, setup).tokenizer.vocab_size
    if vocab > setup.model.vocab_size:
        raise fail("--model", options.model, f"vocab_size {setup.model.vocab_size} is smaller than the "
                   f"tokenizer's {vocab}", f"use a model with vocab_size >= {vocab}")


def _save_hf_needs_hf_model(options: TrainOptions, setup) -> None:
    if options.save_hf and getattr(setup.model, "hf_dir", None) is None:
        raise fail("--save_hf", options.save_hf, f"the model {options.model!r} was not loaded from a Hugging Face "
                   "directory (no architecture to write)", "train from --model hf:DIR, or leave --save_hf out")


#: the cross-checks, in order (the data is built once, by the first that needs it)
CROSS_CHECKS = {
    "save_hf_needs_hf_model": _save_hf_needs_hf_model,
    "seq_len_within_model": _seq_len_within_model,
    "corpus_fits_one_step": _corpus_fits_one_step,
    "tokenizer_fits_model": _tokenizer_fits_model,
}


def check_run(options: TrainOptions, setup) -> None:
    """The flags against the validated configuration (``initialize.prepare``'s ``Setup``),
    before any process group: what neither can get wrong alone."""
    for check in CROSS_CHECKS.values():
        check(options, setup)
