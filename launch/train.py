"""Main job: train a LLaMA model as a DeepSpeed pipeline with CheckFree recovery.

Works under the three launchers (one process per stage):
    deepspeed --num_gpus 4 launch/train.py --deepspeed_config ds_configs/checkfree.json
    torchrun --standalone --nproc_per_node 4 launch/train.py --deepspeed_config ...
    mpirun -n 4 python launch/train.py --deepspeed_config ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_checkfree.config import ConfigError  # noqa: E402  (cheap: no deepspeed import yet)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a 'checkfree' section")
    p.add_argument("--model", default="tiny", help="preset name (tiny, 124m, 500m, 1.5b) or a YAML path")
    p.add_argument("--num_layers", type=int, default=None, help="override the preset's decoder layer count")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps to run")
    p.add_argument("--output_dir", default=None, help="writes metrics.jsonl and run.json here")
    p.add_argument("--seed", type=int, default=0, help="data order and model init seed")
    p.add_argument("--data", default=None,
                   help="corpus: default Shakespeare; a text file, a directory of .txt, or hf:PATH[#column]")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sample (default: the model's max_seq_len)")
    p.add_argument("--eval_every", type=int, default=10, help="validation every N steps (0: only at the end)")
    p.add_argument("--eval_batches", type=int, default=4, help="validation micro-batches")
    p.add_argument("--fail_at", action="append", default=[], metavar="STAGE:STEP",
                   help="logical failure of STAGE at the start of STEP (repeatable)")
    p.add_argument("--failure_rate", type=float, default=None, help="failures per stage per hour, in percent")
    p.add_argument("--assumed_step_seconds", type=float, default=None, help="step time used by the rate model")
    p.add_argument("--failure_seed", type=int, default=None)
    p.add_argument("--failure_schedule", default=None, help="JSON failure schedule to replay")
    p.add_argument("--save_failure_schedule", default=None, help="write the failures this run will see to a file")
    p.add_argument("--dump_recovery_dir", default=None, help="debug: save stage states around each recovery")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


def merged_config(args) -> dict:
    """The DeepSpeed JSON with command-line failure options merged into its checkfree section."""
    try:
        with open(args.deepspeed_config, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config = {args.deepspeed_config!r}: no such file. Fix: pass a path such as "
                          "ds_configs/checkfree.json.")
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config = {args.deepspeed_config!r}: invalid JSON ({e}).")
    section = cfg.setdefault("checkfree", {"mode": "off"})
    if args.fail_at:
        section["fail_at"] = list(section.get("fail_at", [])) + list(args.fail_at)
    for key in ("failure_rate", "assumed_step_seconds", "failure_seed", "failure_schedule"):
        value = getattr(args, key)
        if value is not None:
            section[key] = value
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1:
        raise ConfigError(f"--steps = {args.steps}: must be >= 1.")
    cfg = merged_config(args)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from ds_checkfree.initialize import prepare
    prepare(cfg, args.model, {"num_layers": args.num_layers})  # fail fast, before any process group

    from ds_checkfree.trainer import Trainer
    trainer = Trainer(args, cfg)
    return trainer.run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        sys.exit(2)
