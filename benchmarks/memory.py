"""Memory per stage process: stock DeepSpeed PipelineEngine against CheckFree and CheckFree+.

One launch per engine (``--memory_rounds`` rounds, order rotated), each under torchrun with
the configs of ``benchmarks.step_time``: after the steps each rank reports its peak RSS
(``ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated``) and the exact bytes of the tensors
its engine keeps (parameters, gradients, optimizer state, buffers). Printed per stage against
stock, with CheckFree+'s extra parameters against the replica count; CSV ``--csv`` (default
``benchmarks/results/memory.csv``).

    python -m benchmarks.memory --memory_rounds 2 --steps 10
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

from benchmarks.step_time import (BASE_VARIANTS, ROOT, add_run_args, build_configs, check_run_args, relaunch,
                                  replica_parameters)

VARIANTS = BASE_VARIANTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--memory_rounds", type=int, default=2, help="launches per engine")
    p.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "memory.csv"))
    p.add_argument("--only", choices=BASE_VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_run_args(p, args, "memory_rounds")
    return args


def tensor_bytes(engine) -> dict:
    """Exact bytes of the tensors an engine keeps between steps, by kind (distinct storages)."""
    import torch
    seen, out = set(), {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}

    def add(kind, t):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out[kind] += t.numel() * t.element_size()
    for p in engine.module.parameters():
        add("params", p)
        if p.grad is not None:
            add("grads", p.grad)
    for state in engine.optimizer.state.values():
        for v in state.values():
            add("optimizer", v)
    for b in engine.module.buffers():
        add("buffers", b)
    return out


def memory_worker(args) -> int:
    """One engine (``--only``) in this process: after the steps, each rank's peak RSS
    (``ru_maxrss``) and the exact tensor bytes its engine keeps; rank 0 appends a JSON line."""
    import logging
    import resource

    import torch
    import torch.distributed as tdist

    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.utils import logger as ds_logger
    from ds_checkfree.data import build_data
    from ds_checkfree.pipe.engine import CheckFreePipelineEngine
    from ds_checkfree.initialize import build
    ds_logger.setLevel(logging.WARNING)
    v = args.only
    cfg = build_configs(args)[v]
    engine, setup = build(cfg, args.model, {"num_layers": args.num_layers},
                               engine_class=PipelineEngine if v == "stock" else CheckFreePipelineEngine)
    seq_len = args.seq_len or setup.model.max_seq_len
    data = build_data(None, seq_len, engine.train_micro_batch_size_per_gpu(), seed=args.seed)
    engine.set_dataiterator(data.train.iterator(0))
    for _ in range(args.warmup + args.steps):
        engine.train_batch()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        unit = "max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        unit = "peak_rss"
    mine = {"rank": tdist.get_rank(), "stage": engine.stage_id, unit: peak, **tensor_bytes(engine),
            "param_count": sum(p.numel() for p in engine.module.parameters())}
    everyone = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, mine)
    if tdist.get_rank() == 0:
        with open(args.memory_out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"variant": v, "unit": unit, "ranks": everyone}) + "\n")
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


def memory_report(argv: list[str], args) -> int:
    """One launch per engine (stock, checkfree, plus), ``--memory_rounds`` rounds in rotated
    order; per stage the median peak RSS and the exact tensor bytes; CheckFree+'s extra against
    its replica parameter count."""
    import tempfile
    rest = list(argv)
    out = tempfile.mktemp(suffix=".jsonl", prefix="checkfree_memory_")
    for r in range(args.memory_rounds):
        for k in range(len(VARIANTS)):
            v = VARIANTS[(r + k) % len(VARIANTS)]
            rc = relaunch(rest + ["--only", v, "--memory_out", out], args.nproc, "benchmarks.memory")
            if rc != 0:
                return rc
    with open(out, encoding="utf-8") as f:
        runs = [json.loads(line) for line in f if line.strip()]
    os.remove(out)
    unit = runs[0]["unit"]
    stages = sorted({r["stage"] for r in runs[0]["ranks"]})
    peak = {v: {s: statistics.median(x[unit] for run in runs if run["variant"] == v for x in run["ranks"]
                                     if x["stage"] == s) for s in stages} for v in VARIANTS}
    kinds = ("params", "grads", "optimizer", "buffers")
    exact = {}
    for v in VARIANTS:
        run = next(run for run in runs if run["variant"] == v)
        exact[v] = {x["stage"]: x for x in run["ranks"]}
    from ds_checkfree.models import load_model_config
    rep = replica_parameters(load_model_config(args.model, num_layers=args.num_layers))
    print(f"\n## Memory per stage process ({unit}, median of {args.memory_rounds} launches per engine; "
          f"{len(stages)} stages, {args.model}, micro-batch {args.micro_batch_size} x {args.micro_batches})\n")
    print("| stage | stock (MB) | checkfree - stock (MB) | plus - stock (MB) | tensor bytes stock | "
          "checkfree - stock (bytes) | plus - stock (bytes) | plus extra parameters |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for s in stages:
        tb = {v: sum(exact[v][s][k] for k in kinds) for v in VARIANTS}
        extra_params = exact["plus"][s]["param_count"] - exact["stock"][s]["param_count"]
        print(f"| {s} | {peak['stock'][s] / 1e6:.1f} | {(peak['checkfree'][s] - peak['stock'][s]) / 1e6:+.2f} | "
              f"{(peak['plus'][s] - peak['stock'][s]) / 1e6:+.2f} | {tb['stock']:,} | "
              f"{tb['checkfree'] - tb['stock']:+,} | {tb['plus'] - tb['stock']:+,} | {extra_params:,} |")
        rows.append({"stage": s, "unit": unit, **{f"{v}_peak_bytes": int(peak[v][s]) for v in VARIANTS},
                     **{f"{v}_tensor_bytes": tb[v] for v in VARIANTS},
                     **{f"{v}_{k}_bytes": exact[v][s][k] for v in VARIANTS for k in kinds},
                     "plus_extra_params": extra_params, "rounds": args.memory_rounds, "model": args.model,
                     "num_stages": args.num_stages})
    total_extra = sum(r["plus_extra_params"] for r in rows)
    plus_extra_bytes = sum(r["plus_tensor_bytes"] - r["stock_tensor_bytes"] for r in rows)
    cf_extra_bytes = sum(r["checkfree_tensor_bytes"] - r["stock_tensor_bytes"] for r in rows)
    by_kind = {k: sum(r[f"plus_{k}_bytes"] - r[f"stock_{k}_bytes"] for r in rows) for k in kinds}
    print(f"\ncheckfree - stock tensor bytes over all stages: {cf_extra_bytes:+,} (goal: 0)")
    print(f"plus - stock: {total_extra:,} extra parameters (replicas by class count: {rep['total']:,}: "
          f"{'match' if total_extra == rep['total'] else 'DIFFER'}), {plus_extra_bytes:+,} tensor bytes = "
          f"{plus_extra_bytes / max(total_extra, 1):.1f} bytes per replica parameter ("
          + ", ".join(f"{k} {v:+,}" for k, v in by_kind.items()) +
          "; between steps DeepSpeed has freed the gradients: fp32 weight + 2 Adam moments = 12)")
    path = os.path.abspath(args.csv)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return memory_report(argv, args)
    if args.only is None:
        raise SystemExit("benchmarks.memory under a launcher runs one engine: it is started with --only by itself")
    return memory_worker(args)


if __name__ == "__main__":
    sys.exit(main())
