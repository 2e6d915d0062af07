"""Failure-free step time of CheckFree / CheckFree+ against DeepSpeed's stock PipelineEngine.

What it measures
    Three engines are built in the SAME processes, on the same model, weights and data:
      stock      deepspeed.runtime.pipe.PipelineEngine, checkfree = {"mode": "off"}
      checkfree  CheckFreePipelineEngine, mode "checkfree"      (DeepSpeed's TrainSchedule)
      plus       CheckFreePipelineEngine, mode "checkfree_plus" (out-of-order schedule,
                 replicated embedding on stage 1 and norm+head on stage S-2)
    After ``--warmup`` untimed steps per engine, each of ``--steps`` rounds runs one
    ``train_batch`` of every engine, in an order rotated every round (stock, checkfree, plus /
    checkfree, plus, stock / ...) so no engine always goes first. Before each timed step all
    ranks meet at ``torch.distributed.barrier()`` so engines never overlap; a step's time is the
    slowest rank's ``time.perf_counter()`` interval around its ``train_batch``.

    Reported per engine: median / mean step time, tokens/s (train_batch_size * seq_len / step
    time, on the median), and the step-time ratios checkfree/stock, plus/stock, plus/checkfree
    (ratio of medians; 95% CI from a paired bootstrap over rounds). A ratio > 1 means slower;
    the goal for checkfree/stock is 1.00 to 1.02 (CheckFree adds only a per-stage gradient-norm
    record, one fused pass per step; the norms travel on the loss all-reduce that replaces
    DeepSpeed's loss broadcast). Also reported: the memory CheckFree+ spends on
    its replicated embedding / head (parameter count from ``ds_checkfree.models`` classes, as
    ``ds_checkfree.run_info.replica_parameters``; MB as fp32 weights and as weights + grads + Adam moments),
    cross-checked against the parameters each stage actually holds.

    With ``--redundant`` two more engines join the rounds (mode "redundant", each with its
    ``RedundantShadow``; a step is ``train_batch`` + the shadow's ``after_step``):
      redundant     Bamboo: the successor's forward run redundantly on every micro-batch
                    (``checkfree.redundant_forward: true``) + gradient shipping + shadow step
      redundant_lb  the lower bound: gradient shipping + shadow optimizer step only
    and the ratios redundant/stock, redundant_lb/stock, redundant/redundant_lb.

    Cross-talk check: stock and checkfree run the same schedule on the same weights and data,
    so their losses must agree at every step; the script prints the largest difference. (plus
    differs by design: odd micro-batches run in the swapped stage order.)

Config
    The shipped ``ds_configs/baseline.json``, ``checkfree.json`` and ``checkfree_plus.json``
    with ``train_micro_batch_size_per_gpu = --micro_batch_size``, ``gradient_accumulation_steps
    = --micro_batches`` and ``checkfree.num_stages = --num_stages``; printed in full.

Memory per stage process: ``python -m benchmarks.memory`` (``benchmarks/memory.py``).

Run (from the checkout's root)
    python -m benchmarks.step_time [--nproc 4] --steps 20
        (no RANK/LOCAL_RANK in the environment: re-launches itself under
         ``python -m torch.distributed.run --standalone --nproc_per_node N`` with
         DS_ACCELERATOR=cpu (when no CUDA) and OMP_NUM_THREADS=1 unless set)
    deepspeed --num_gpus 4 --master_port 29611 --module benchmarks.step_time --steps 30
    torchrun --standalone --nproc_per_node 4 -m benchmarks.step_time --steps 30
    python -m benchmarks.step_time --model 124m --num_layers 4 --seq_len 128 --steps 10
    python -m benchmarks.step_time --model hf:/path/to/llama --seq_len 128 --steps 10   # a Hugging Face model

Output (rank 0): machine and versions, exact configs, a markdown table on stdout; a summary CSV
(``--csv``, default benchmarks/results/step_time.csv), the raw per-round times next to it
(``<csv>_rounds.csv``), and with ``--plot PATH`` a bar chart (matplotlib, Agg backend).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import sys
import time

from ds_checkfree.testing import REPO, torchrun_cmd

ROOT = str(REPO)

BASE_VARIANTS = ("stock", "checkfree", "plus")
REDUNDANT_VARIANTS = ("redundant", "redundant_lb")  # with --redundant
VARIANTS = BASE_VARIANTS
CONFIG_FILES = {"stock": "baseline.json", "checkfree": "checkfree.json", "plus": "checkfree_plus.json",
                "redundant": "redundant.json", "redundant_lb": "redundant.json"}
BASE_RATIOS = (("checkfree", "stock"), ("plus", "stock"), ("plus", "checkfree"))
REDUNDANT_RATIOS = (("redundant", "stock"), ("redundant_lb", "stock"), ("redundant", "redundant_lb"))
RATIOS = BASE_RATIOS


def use_variants(redundant: bool) -> None:
    """Which engines run: the three base ones, plus the two redundant baselines with --redundant."""
    global VARIANTS, RATIOS
    VARIANTS = BASE_VARIANTS + (REDUNDANT_VARIANTS if redundant else ())
    RATIOS = BASE_RATIOS + (REDUNDANT_RATIOS if redundant else ())


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of a run of the engines, shared with ``benchmarks.memory``."""
    p.add_argument("--model", default="tiny", help="preset name (tiny, small, 124m, 500m, 1.5b), a YAML path, or "
                                                   "hf:DIR (a local Hugging Face model)")
    p.add_argument("--num_layers", type=int, default=None, help="override the preset's decoder layer count")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (each runs one step of every engine)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per engine before the rounds")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--micro_batches", type=int, default=8, help="gradient_accumulation_steps")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sample (default: the model's max_seq_len)")
    p.add_argument("--num_stages", type=int, default=4, help="pipeline stages (ranks = stages * data-parallel)")
    p.add_argument("--nproc", type=int, default=4, help="processes when the script launches itself")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")


def check_run_args(p: argparse.ArgumentParser, args, *positive: str) -> None:
    for name in ("steps", "micro_batch_size", "micro_batches", "num_stages", "nproc", *positive):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step of an engine exchanges shapes and builds buffers)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the ratio CIs")
    p.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "step_time.csv"))
    p.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logging")
    p.add_argument("--redundant", action="store_true",
                   help="also time the redundant-computation baselines (Bamboo and its lower bound)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="cProfile each engine's timed steps per rank into DIR/<variant>_rank<r>.pstats "
                        "(to find where a ratio's extra time goes; the timings then include the profiler)")
    args = p.parse_args(argv)
    check_run_args(p, args, "bootstrap")
    use_variants(args.redundant)
    return args


# --------------------------------------------------------------------------- self-launch
def relaunch(argv: list[str], nproc: int, module: str = "benchmarks.step_time") -> int:
    """Re-run ``module`` under torchrun with ``nproc`` workers; return the child's exit code."""
    import subprocess
    rest, skip = [], False
    for a in argv:  # --nproc is the launcher's business, not the workers'
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if "DS_ACCELERATOR" not in env:
        try:
            import torch
            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"
        except ImportError:
            env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = torchrun_cmd(nproc) + ["-m", module, *rest]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


# --------------------------------------------------------------------------- configs
def build_configs(args) -> dict[str, dict]:
    cfgs = {}
    for v in VARIANTS:
        with open(os.path.join(ROOT, "ds_configs", CONFIG_FILES[v]), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
        cfg["gradient_accumulation_steps"] = args.micro_batches
        cfg.pop("train_batch_size", None)
        if v == "stock":
            cfg["checkfree"] = {"mode": "off", "num_stages": args.num_stages}
        else:
            cfg["checkfree"]["num_stages"] = args.num_stages
        if v in REDUNDANT_VARIANTS:
            cfg["checkfree"]["redundant_forward"] = v == "redundant"
        cfgs[v] = cfg
    assert cfgs["checkfree"]["checkfree"]["mode"] == "checkfree"
    assert cfgs["plus"]["checkfree"]["mode"] == "checkfree_plus"
    return cfgs


# --------------------------------------------------------------------------- statistics
def bootstrap_ratio(num: list[float], den: list[float], resamples: int, seed: int = 0):
    """Ratio of medians and its 95% CI, resampling rounds in pairs (same round for both)."""
    import numpy as np
    a, b = np.asarray(num), np.asarray(den)
    point = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boots = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def machine_info() -> dict:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(
                os, "sched_getaffinity") else None, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "accelerator": get_accelerator().device_name(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def replica_parameters(model_cfg) -> dict:
    """Extra parameters CheckFree+ holds: a copy of the head (embedding, stage 1) and of the tail
    (norm + LM head, stage S-2), counted on the meta device from the model's own specs."""
    import torch
    parts = model_cfg.parts()
    with torch.device("meta"):
        embed = sum(p.numel() for spec in parts.head for p in spec.build().parameters())
        head = sum(p.numel() for spec in parts.tail for p in spec.build().parameters())
    return {"embed": embed, "head": head, "total": embed + head}


# --------------------------------------------------------------------------- worker
def worker(args) -> int:
    import logging

    import torch
    import torch.distributed as tdist

    from deepspeed.runtime.pipe.engine import PipelineEngine
    from ds_checkfree.data import build_data
    from ds_checkfree.pipe.engine import CheckFreePipelineEngine
    from ds_checkfree.initialize import build

    if not args.verbose:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)

    cfgs = build_configs(args)
    overrides = {"num_layers": args.num_layers}
    classes = {"stock": PipelineEngine, "checkfree": CheckFreePipelineEngine, "plus": CheckFreePipelineEngine,
               "redundant": CheckFreePipelineEngine, "redundant_lb": CheckFreePipelineEngine}
    engines, setups, t_build, shadows = {}, {}, {}, {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        # build() validates a copy; DeepSpeed may annotate the dict it is given.
        engines[v], setups[v] = build(copy.deepcopy(cfgs[v]), args.model, overrides, engine_class=classes[v])
        if v in REDUNDANT_VARIANTS:
            from ds_checkfree.baselines import RedundantShadow
            shadows[v] = RedundantShadow(engines[v])  # redundant_forward from the engine's config
        t_build[v] = time.perf_counter() - t0
    rank = tdist.get_rank()
    world = tdist.get_world_size()
    ref = engines["stock"]
    for v in VARIANTS:  # same topology everywhere: DeepSpeed's p2p module keeps one global grid
        e = engines[v]
        assert (e.stage_id, e.num_stages, e.micro_batches, e.train_batch_size()) == \
            (ref.stage_id, ref.num_stages, ref.micro_batches, ref.train_batch_size()), v
        assert e.grid.stage_to_global(stage_id=e.num_stages - 1) == ref.grid.stage_to_global(
            stage_id=ref.num_stages - 1), v
    model_cfg = setups["stock"].model
    seq_len = args.seq_len or model_cfg.max_seq_len
    dp_id, dp_size = ref.grid.get_data_parallel_id(), ref.grid.get_data_parallel_world_size()
    data = build_data(None, seq_len, ref.train_micro_batch_size_per_gpu(), seed=args.seed, dp_rank=dp_id,
                      dp_size=dp_size, max_val_batches=1, tokenizer=getattr(model_cfg, "tokenizer", None))
    for v in VARIANTS:  # each engine its own iterator over the same (stateless) micro-batch stream
        engines[v].set_dataiterator(data.train.iterator(0))
    tokens_per_step = ref.train_batch_size() * seq_len

    # Parameters each rank holds, per engine (distinct tensors; tied replicas count on each holder).
    from ds_checkfree.pipe.devices import comm_device, comm_tensor
    dev = comm_device()  # NCCL wants accelerator tensors, gloo CPU ones
    held = comm_tensor([[sum(p.numel() for p in engines[v].module.parameters())] for v in VARIANTS],
                       dtype=torch.float64)
    held_all = [torch.zeros_like(held) for _ in range(world)]
    tdist.all_gather(held_all, held)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(v):
        loss = engines[v].train_batch()
        if v in shadows:
            shadows[v].after_step()
        sync()  # a step ends when its kernels do, not when they are queued
        return loss

    losses = {v: [] for v in VARIANTS}
    for _ in range(args.warmup):
        for v in VARIANTS:
            tdist.barrier()
            losses[v].append(float(step(v)))

    profiles = {}
    if args.profile:
        import cProfile
        profiles = {v: cProfile.Profile() for v in VARIANTS}
    times = torch.zeros(args.steps, len(VARIANTS), dtype=torch.float64)
    cpu = torch.zeros_like(times)
    for r in range(args.steps):
        order = [VARIANTS[(r + k) % len(VARIANTS)] for k in range(len(VARIANTS))]
        for v in order:
            tdist.barrier()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            if profiles:
                profiles[v].enable()
            loss = step(v)
            if profiles:
                profiles[v].disable()
            times[r, VARIANTS.index(v)] = time.perf_counter() - t0
            cpu[r, VARIANTS.index(v)] = time.process_time() - c0
            losses[v].append(float(loss))
    if profiles:
        os.makedirs(args.profile, exist_ok=True)
        for v, prof in profiles.items():
            prof.dump_stats(os.path.join(args.profile, f"{v}_rank{rank}.pstats"))
    times, cpu = times.to(dev), cpu.to(dev)
    tdist.all_reduce(times, op=tdist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    tdist.all_reduce(cpu, op=tdist.ReduceOp.SUM)  # the work a step costs, over all ranks
    times, cpu = times.cpu(), cpu.cpu()

    shadow_info = {v: sh.local_summary() for v, sh in shadows.items()}
    gathered = [None] * world
    tdist.all_gather_object(gathered, shadow_info)
    if rank == 0:
        report(args, cfgs, setups["stock"], model_cfg, seq_len, ref, world, dp_size, tokens_per_step, times,
               losses, held_all, t_build, cpu=cpu, shadows=gathered)
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


def report(args, cfgs, setup, model_cfg, seq_len, ref, world, dp_size, tokens_per_step, times, losses, held_all,
           t_build, cpu=None, shadows=None) -> None:
    cols = {v: times[:, i].tolist() for i, v in enumerate(VARIANTS)}
    info = machine_info()
    print("\n## Step time: CheckFree / CheckFree+ vs stock DeepSpeed PipelineEngine (failure-free)\n")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"world: {world} ranks = {ref.num_stages} stages x {dp_size} data-parallel; model {model_cfg.name} "
          f"({model_cfg.num_blocks} decoder layers, hidden {model_cfg.to_dict().get('hidden_size')}, "
          f"{model_cfg.num_parameters() / 1e6:.2f}M params), seq_len {seq_len}, micro-batch "
          f"{ref.train_micro_batch_size_per_gpu()} x {ref.micro_batches} micro-batches = train_batch_size "
          f"{ref.train_batch_size()} ({tokens_per_step} tokens/step)")
    print(f"rounds: {args.steps} timed (order rotated every round) after {args.warmup} warm-up steps per engine; "
          f"all engines in the same processes (build time: " +
          ", ".join(f"{v} {t_build[v]:.1f} s" for v in VARIANTS) + ")")
    for v in VARIANTS:
        print(f"config[{v}] ({CONFIG_FILES[v]} + overrides): {json.dumps(cfgs[v], sort_keys=True)}")

    # cross-talk check between engines living in one process
    diff = max(abs(a - b) for a, b in zip(losses["stock"], losses["checkfree"]))
    print(f"\nloss check: max |loss(stock) - loss(checkfree)| over {len(losses['stock'])} steps = {diff:.3e} "
          f"({'OK: identical training, engines do not interfere' if diff < 1e-5 else 'MISMATCH'}); "
          f"last losses: " + ", ".join(f"{v} {losses[v][-1]:.4f}" for v in VARIANTS))
    for v in (x for x in REDUNDANT_VARIANTS if x in VARIANTS):
        d = max(abs(a - b) for a, b in zip(losses["stock"], losses[v]))
        print(f"loss check: max |loss(stock) - loss({v})| = {d:.3e} ({'OK' if d < 1e-5 else 'MISMATCH'})")

    rows = []
    print("\n| engine | mode | median step (s) | mean step (s) | std (s) | min (s) | tokens/s (median) | "
          "step time / stock [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    modes = {v: cfgs[v]["checkfree"]["mode"] for v in VARIANTS}
    engine_names = {"stock": "PipelineEngine", "checkfree": "CheckFreePipelineEngine",
                    "plus": "CheckFreePipelineEngine", "redundant": "CheckFreePipelineEngine + Bamboo shadow",
                    "redundant_lb": "CheckFreePipelineEngine + shadow (lower bound)"}
    ratios = {}
    for num, den in RATIOS:
        ratios[(num, den)] = bootstrap_ratio(cols[num], cols[den], args.bootstrap)
    for v in VARIANTS:
        xs = cols[v]
        med, mean = statistics.median(xs), statistics.fmean(xs)
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        r = (1.0, 1.0, 1.0) if v == "stock" else ratios[(v, "stock")]
        print(f"| {engine_names[v]} | {modes[v]} | {med:.4f} | {mean:.4f} | {std:.4f} | {min(xs):.4f} | "
              f"{tokens_per_step / med:,.0f} | {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] |")
        rows.append({"variant": v, "engine": engine_names[v], "mode": modes[v], "rounds": len(xs),
                     "median_s": round(med, 6), "mean_s": round(mean, 6), "std_s": round(std, 6),
                     "min_s": round(min(xs), 6), "tokens_per_s_median": round(tokens_per_step / med, 2),
                     "tokens_per_s_mean": round(tokens_per_step / mean, 2),
                     "ratio_vs_stock": round(r[0], 5), "ratio_vs_stock_ci_lo": round(r[1], 5),
                     "ratio_vs_stock_ci_hi": round(r[2], 5)})

    print("\n| ratio (step time, median/median) | value | 95% bootstrap CI | mean/mean | "
          "median of per-round ratios | tokens/s ratio |")
    print("|---|---|---|---|---|---|")
    for num, den in RATIOS:
        p, lo, hi = ratios[(num, den)]
        mean_ratio = statistics.fmean(cols[num]) / statistics.fmean(cols[den])
        paired = statistics.median(a / b for a, b in zip(cols[num], cols[den]))
        print(f"| {num} / {den} | {p:.3f} | [{lo:.3f}, {hi:.3f}] | {mean_ratio:.3f} | {paired:.3f} | {1 / p:.3f} |")
    p, lo, hi = ratios[("checkfree", "stock")]
    if hi <= 1.02:
        verdict = "meets the goal: the whole CI is at or below 1.02"
    elif lo > 1.02:
        verdict = "misses the goal: the whole CI is above 1.02"
    else:
        verdict = (f"point estimate {'within' if p <= 1.02 else 'above'} the goal, but the CI straddles 1.02: "
                   "too noisy to decide; run more --steps on a quieter machine")
    print(f"\ngoal checkfree/stock 1.00-1.02: measured {p:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]; {verdict}")

    if shadows and any(shadows):
        print("\n| redundant variant | stage | shadow of | redundant forwards | forward s/step | "
              "shadow step + comm s/step | shadow memory (weights + Adam + buffers) |\n|---|---|---|---|---|---|---|")
        for v in REDUNDANT_VARIANTS:
            for sh in sorted((g[v] for g in shadows if v in g), key=lambda x: x["stage"]):
                n = max(sh["steps"], 1)
                print(f"| {v} | {sh['stage']} | {sh['shadow_of']} | {sh['shadow_forwards']} "
                      f"({sh['shadow_forwards'] / n:.0f}/step) | {sh['shadow_forward_s_total'] / n:.4f} | "
                      f"{(sh['shadow_step_s_total'] + sh['comm_s_total']) / n:.4f} | "
                      f"{sh['memory_bytes']['total'] / 1e6:.2f} MB "
                      f"(own weights {sh['own_weight_bytes'] / 1e6:.2f} MB) |")

    # CheckFree+ memory overhead
    rep = replica_parameters(model_cfg)
    held = {v: [float(t[i, 0]) for t in held_all] for i, v in enumerate(VARIANTS)}
    stages = ref.num_stages
    per_stage = {v: [sum(held[v][rk] for rk in _stage_ranks(ref, s)) / dp_size for s in range(stages)]
                 for v in VARIANTS}
    extra = [per_stage["plus"][s] - per_stage["checkfree"][s] for s in range(stages)]
    mb = rep["total"] * 4 / 1e6
    print(f"\nCheckFree+ replicas (ds_checkfree.models classes): embedding {rep['embed']:,} + norm/head "
          f"{rep['head']:,} = {rep['total']:,} parameters = {mb:.2f} MB fp32 weights, "
          f"{mb * 4:.2f} MB with fp32 grads + Adam moments; "
          f"{100 * rep['total'] / model_cfg.num_parameters():.1f}% of the model "
          f"(embedding on stage 1, head on stage {stages - 2})")
    print("parameters held per stage (one replica): "
          + "; ".join(f"{v} [" + ", ".join(f"{int(x):,}" for x in per_stage[v]) + "]" for v in VARIANTS))
    print("measured extra of plus over checkfree per stage: [" + ", ".join(f"{int(x):,}" for x in extra) +
          f"] (total {int(sum(extra)):,}; {'matches' if int(sum(extra)) == rep['total'] else 'DIFFERS FROM'} "
          f"the class count)")

    if cpu is not None:
        # CPU seconds a step costs summed over ranks (process_time: every thread, gloo's included,
        # not the time spent waiting): the work an engine adds, much less sensitive to other load
        ccols = {v: cpu[:, i].tolist() for i, v in enumerate(VARIANTS)}
        print("\n| CPU time per step, all ranks (s) | median | ratio vs stock [95% CI] |\n|---|---|---|")
        for row in rows:
            v = row["variant"]
            c = (1.0, 1.0, 1.0) if v == "stock" else bootstrap_ratio(ccols[v], ccols["stock"], args.bootstrap)
            print(f"| {v} | {statistics.median(ccols[v]):.4f} | {c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}] |")
            row.update({"cpu_median_s": round(statistics.median(ccols[v]), 6), "cpu_ratio_vs_stock": round(c[0], 5),
                        "cpu_ratio_ci_lo": round(c[1], 5), "cpu_ratio_ci_hi": round(c[2], 5)})
    common = {"model": model_cfg.name, "num_layers": model_cfg.num_blocks, "seq_len": seq_len,
              "micro_batch_size": ref.train_micro_batch_size_per_gpu(), "micro_batches": ref.micro_batches,
              "train_batch_size": ref.train_batch_size(), "tokens_per_step": tokens_per_step,
              "num_stages": stages, "world_size": world, "warmup": args.warmup,
              "replica_params": rep["total"], "replica_mb_fp32": round(mb, 4),
              "cpu_count": info["cpu_count"], "accelerator": info["accelerator"], "torch": info["torch"],
              "deepspeed": info["deepspeed"], "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for row in rows:
        row.update(common)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)) or ".", exist_ok=True)
    with open(args.csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    rounds_path = os.path.splitext(args.csv)[0] + "_rounds.csv"
    with open(rounds_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["round", "first_engine", *[f"{v}_s" for v in VARIANTS]])
        for r in range(len(cols["stock"])):
            w.writerow([r, VARIANTS[r % len(VARIANTS)], *[round(cols[v][r], 6) for v in VARIANTS]])
    print(f"\nwrote {args.csv} and {rounds_path}")
    if args.plot:
        plot(args.plot, rows, model_cfg, seq_len, tokens_per_step)
        print(f"wrote {args.plot}")


def _stage_ranks(engine, stage: int) -> list[int]:
    return [engine.grid.stage_to_global(stage_id=stage, data=d)
            for d in range(engine.grid.get_data_parallel_world_size())]


def plot(path: str, rows: list[dict], model_cfg, seq_len: int, tokens_per_step: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['variant']}\n({r['mode']})" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    med = [r["median_s"] for r in rows]
    colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#98df8a"][:len(rows)]
    ax1.bar(labels, med, color=colors)
    ax1.set_ylabel("median step time (s)")
    for i, r in enumerate(rows):
        ax1.text(i, med[i], f"x{r['ratio_vs_stock']:.3f}", ha="center", va="bottom", fontsize=8)
    ax2.bar(labels, [r["tokens_per_s_median"] for r in rows], color=colors)
    ax2.set_ylabel("tokens/s (median step)")
    fig.suptitle(f"{model_cfg.name}, {model_cfg.num_blocks} layers, seq {seq_len}, {tokens_per_step} tokens/step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return relaunch(argv, args.nproc)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
