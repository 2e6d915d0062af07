"""The run's command-line options as one typed object, and the input checks that need no process group.

``launch/train.py`` parses its flags into ``TrainOptions`` once; the trainer reads only this
object (never an argparse namespace). ``check_inputs`` looks at every input a user names
(model preset or YAML, corpus, failure schedule) before any process group starts, so a bad
one ends in one line with exit status 2, not in a traceback from every rank.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ds_checkfree.config.checkfree import ConfigError


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


def _fail(flag: str, value, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{flag} = {value!r}: {problem}. Fix: {fix}.")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 10.0.0.5:29400")
    return host.strip("[]"), int(port)


def check_inputs(options: TrainOptions) -> None:
    """Every user-named input that the config validation does not already cover."""
    if options.steps < 1:
        raise _fail("--steps", options.steps, "must be >= 1", "pass a positive number of steps")
    for flag in ("eval_every", "eval_batches"):
        value = getattr(options, flag)
        if value < 0 or (flag == "eval_batches" and value == 0):
            raise _fail(f"--{flag}", value, "out of range", "use a positive number" +
                        (" (0 validates only at the end)" if flag == "eval_every" else ""))
    if options.heartbeat_ab_window_s is not None and options.heartbeat_ab_window_s <= 0:
        raise _fail("--heartbeat_ab_window_s", options.heartbeat_ab_window_s, "must be > 0",
                    "use e.g. 1.5 (seconds) or leave it out")
    if options.coordinator is not None:
        try:
            parse_address(options.coordinator)
        except ValueError as err:
            raise _fail("--join/--coordinator", options.coordinator, str(err).split(": ", 1)[-1],
                        "pass the address the job printed, e.g. 10.0.0.5:29400") from None
    if options.seq_len is not None and options.seq_len < 2:
        raise _fail("--seq_len", options.seq_len, "must be >= 2", "use e.g. 64 or leave it out")
    if options.resume_from and not os.path.isfile(os.path.join(options.resume_from, "latest")):
        raise ConfigError(f"--resume_from = {options.resume_from!r}: no DeepSpeed checkpoint there (no 'latest' "
                          "file). Fix: pass the checkpoint_dir of an earlier run.")
    from ds_checkfree.data.corpus import check_source
    try:
        check_source(options.data)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"--data = {options.data!r}: {err}") from None
