"""Main job: train a model (built-in LLaMA presets or hf:DIR) as a DeepSpeed pipeline with CheckFree recovery.

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

PROCESS_STARTED_AT = time.time()  # before the heavy imports: restart costs include them

# ds_checkfree is installed (pip install -e . / scripts/setup.sh): no sys.path edit
from ds_checkfree.config.options import CheckedParser, ConfigError  # noqa: E402  (cheap: no deepspeed import yet)


def build_parser() -> CheckedParser:
    """Every flag; each has a rule in ``options.FLAGS`` (a test compares the two), and a bad
    one raises ``ConfigError``."""
    p = CheckedParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a 'checkfree' section")
    p.add_argument("--model", default="tiny", help="preset name (tiny, small, 124m, 500m, 1.5b), a YAML path, or hf:DIR (a local "
                        "Hugging Face Llama/Mistral/Qwen2/GPT-2 directory, trained from its weights)")
    p.add_argument("--num_layers", type=int, default=None, help="override the preset's decoder layer count")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps to run")
    p.add_argument("--output_dir", default=None, help="writes metrics.jsonl and run.json here")
    p.add_argument("--save_hf", default=None, metavar="DIR",
                   help="write the trained model as a Hugging Face directory (AutoModelForCausalLM loads it); "
                        "default for an hf: model with --output_dir: OUTPUT_DIR/hf")
    p.add_argument("--seed", type=int, default=0, help="data order and model init seed")
    p.add_argument("--data", default=None,
                   help="corpus: default Shakespeare; a text file, a directory of .txt, or hf:PATH[#column]")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sample (default: the model's max_seq_len)")
    p.add_argument("--eval_every", type=int, default=10, help="validation every N steps (0: only at the end)")
    p.add_argument("--eval_batches", type=int, default=4, help="validation micro-batches")
    p.add_argument("--fail_at", action="append", default=[], metavar="STAGE[.REPLICA]:STEP",
                   help="logical failure of STAGE (every data-parallel replica, or only REPLICA) at the start "
                        "of STEP (repeatable)")
    p.add_argument("--failure_rate", type=float, default=None, help="failures per stage per hour, in percent")
    p.add_argument("--assumed_step_seconds", type=float, default=None, help="step time used by the rate model")
    p.add_argument("--failure_seed", type=int, default=None)
    p.add_argument("--failure_schedule", default=None, help="JSON failure schedule to replay")
    p.add_argument("--save_failure_schedule", default=None, help="write the failures this run will see to a file")
    p.add_argument("--spares", type=int, default=None,
                   help="idle spare ranks that replace dead stage processes (needs mpirun --with-ft ulfm)")
    p.add_argument("--fault_tolerant", action="store_true",
                   help="survive real process deaths under mpirun --with-ft ulfm (implied by --spares > 0)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="the fault-tolerant job's coordinator (python -m ds_checkfree.elastic.membership.coordinator); "
                        "default under mpirun: rank 0 starts one")
    p.add_argument("--join", dest="coordinator", metavar="HOST:PORT",
                   help="join a running fault-tolerant job (no mpirun needed): become a spare, or take a lost "
                        "stage at once")
    p.add_argument("--resume_from", default=None, metavar="DIR",
                   help="start from the latest DeepSpeed checkpoint in DIR (a restarted job)")
    p.add_argument("--no_heartbeat", action="store_true",
                   help="elastic launch without the heartbeat thread (benchmarks its overhead; deaths are then "
                        "noticed only through the data plane)")
    p.add_argument("--heartbeat_ab_window_s", type=float, default=None, metavar="SECONDS",
                   help="benchmark: the elastic launch's heartbeat beats only in alternate wall-clock windows of "
                        "this length (paired on/off windows, order drawn per pair) to measure its overhead")
    p.add_argument("--dump_recovery_dir", default=None, help="debug: save stage states around each recovery")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


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
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config = {args.deepspeed_config!r}: top level is {type(cfg).__name__}. "
                          "Fix: the DeepSpeed config must be a JSON object {...}.")
    section = cfg.setdefault("checkfree", {"mode": "off"})
    if not isinstance(section, dict):
        from ds_checkfree.config.checkfree import CheckFreeConfig
        CheckFreeConfig.from_dict(section)  # raises, naming the section's type and the fix
    if args.fail_at:
        section["fail_at"] = list(section.get("fail_at", [])) + list(args.fail_at)
    for key in ("failure_rate", "assumed_step_seconds", "failure_seed", "failure_schedule", "spares"):
        value = getattr(args, key)
        if value is not None:
            section[key] = value
    return cfg


def checked_start(args):
    """Every input checked before any process group: the flags (``options.FLAGS``), the
    DeepSpeed JSON and its ``checkfree`` section (``initialize.prepare``), the model, the
    launch, and the flags against all of them (``options.check_run``: the corpus against one
    step, ...). A bad one raises ``ConfigError``. Returns (options, setup, elastic, under_mpi)."""
    from ds_checkfree.config.options import TrainOptions, check_inputs, check_run
    check_inputs(args)
    options = TrainOptions.from_namespace(args, process_started_at=PROCESS_STARTED_AT)
    cfg = merged_config(args)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from ds_checkfree.config.deepspeed_checks import split_deepspeed_config
    from ds_checkfree.initialize import prepare
    spares = split_deepspeed_config(cfg)[1].spares  # the section checked before the launch reads it
    under_mpi = "OMPI_COMM_WORLD_SIZE" in os.environ
    elastic = args.fault_tolerant or bool(spares) or options.coordinator is not None
    if elastic and (under_mpi and not _ulfm_enabled() or not under_mpi and options.coordinator is None):
        raise ConfigError("--spares / --fault_tolerant: surviving a process death needs Open MPI's fault-tolerant "
                          "launch. Fix: mpirun --with-ft ulfm -n <stages+spares> python launch/train.py ..., or "
                          "--join HOST:PORT to join a running job")
    world_size = (int(os.environ["OMPI_COMM_WORLD_SIZE"]) if under_mpi else _joined_world_size(options, cfg)) \
        if elastic else None
    # the one parse of the configuration: everything below receives the validated objects
    setup = prepare(cfg, options.model, {"num_layers": options.num_layers}, world_size=world_size, elastic=elastic)
    check_run(options, setup)
    return options, setup, elastic, under_mpi


def main(argv=None) -> int:
    options, setup, elastic, under_mpi = checked_start(parse_args(argv))
    if not elastic:
        from ds_checkfree.elastic.heartbeat import start_monitor
        from ds_checkfree.trainer import Trainer
        trainer = Trainer(options, setup)
        monitor = None if options.no_heartbeat else start_monitor(setup.checkfree, log=trainer.log)
        return trainer.run(monitor)
    code = run_elastic(options, setup)
    # Leave without Python's finalisation: after a failure, process groups abandoned by the
    # old engine may still own gloo threads whose destructors can block at exit. Under ULFM,
    # MPI_Finalize can also hang after peers died, and a process that skips it is not an
    # error there, so it is skipped.
    sys.stdout.flush()
    sys.stderr.flush()
    if under_mpi and not _ulfm_enabled():
        from mpi4py import MPI
        MPI.Finalize()
    os._exit(code)


def _joined_world_size(options, cfg) -> int:
    """A process started by hand (``--join``) sizes its launch like the job's: stages x
    replicas + spares, asked from the coordinator (the config alone may not say the replicas)."""
    from ds_checkfree.config.options import parse_address
    from ds_checkfree.elastic.membership.client import CoordinatorLost, MemberClient
    try:
        info = MemberClient.query_job(parse_address(options.coordinator))
    except (CoordinatorLost, OSError, ValueError) as err:
        raise ConfigError(f"--join {options.coordinator}: {err}") from None
    cfg["checkfree"].setdefault("spares", info["spares"])
    return info["num_stages"] * info["dp"] + int(cfg["checkfree"].get("spares") or 0)


def _ulfm_enabled() -> bool:
    """``mpirun --with-ft ulfm`` (also via ``deepspeed --launcher_args``) sets this for every rank."""
    return os.environ.get("OMPI_MCA_mpi_ft_enable", "0") not in ("0", "", "false")


def run_elastic(options, setup) -> int:
    """Stage holders train; spares wait until a stage is lost, then take its place."""
    from ds_checkfree.elastic.launch import join_elastic_job
    from ds_checkfree.elastic.membership.client import CoordinatorLost, JoinRefused
    from ds_checkfree.elastic.world import JobFailed, NoSpareLeft
    from ds_checkfree.manager import EXIT_FAILED
    from ds_checkfree.recovery.rules import UnrecoverableFailure
    from ds_checkfree.trainer import Trainer

    who = f"rank {os.environ.get('OMPI_COMM_WORLD_RANK', '?')}"
    world = monitor = None
    try:
        world, joined, monitor = join_elastic_job(
            setup, output_dir=options.output_dir, coordinator=options.coordinator, heartbeat=not options.no_heartbeat,
            ab_window_s=options.heartbeat_ab_window_s, while_spare=lambda: _prepare_spare(options, setup),
            log=lambda msg: print(msg, flush=True))
        if world is None:
            return 0  # a spare released at the end of training
        who = f"member {world.rank}"
        return Trainer(options, setup, world, joined=joined).run(monitor)
    except JoinRefused as err:
        print(f"[{who}] {err}", file=sys.stderr, flush=True)
        return 2
    except (NoSpareLeft, UnrecoverableFailure, CoordinatorLost) as err:
        print(f"[{who}] fatal: {err}", file=sys.stderr, flush=True)
        return 3
    except JobFailed as err:  # another member failed for a reason that is no lost peer
        print(f"[{who}] {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        if monitor is not None:
            monitor.stop()
        if world is not None:
            world.close()
        print(f"[{who}] exiting (pid {os.getpid()})", file=sys.stderr, flush=True)


def _prepare_spare(options, setup) -> None:
    """What a spare can do before it is needed, off a later recovery's critical path: build
    the data (memoised: the Trainer's identical call returns it), pay DeepSpeed's one-time
    first-build costs (the survivors would wait for them) and freeze the start-up objects
    out of the garbage collector's reach."""
    from ds_checkfree.data import build_data
    from ds_checkfree.initialize import warm_up_first_build
    from ds_checkfree.recovery.process_loss import freeze_startup_objects
    micro = setup.ds_config.get("train_micro_batch_size_per_gpu")
    if micro is not None and setup.dp_size == 1:  # with replicas its data-parallel rank is not known yet
        build_data(options.data, options.seq_len or setup.model.max_seq_len, micro, seed=options.seed,
                   dp_rank=0, dp_size=1, max_val_batches=options.eval_batches,
                   tokenizer=getattr(setup.model, "tokenizer", None))
    warm_up_first_build()
    freeze_startup_objects()


def _reports_errors() -> bool:
    """Launchers start this script once per rank, all with the same inputs: the first process
    of each host prints a configuration error (once on one host; a path missing on one host
    only is still reported from there), the others only exit with its status."""
    for keys in (("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
                 ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        for key in keys:
            if os.environ.get(key) is not None:
                return os.environ[key] == "0"
    return True


def run_cli(argv=None) -> int:
    """The script: ``main``, with a configuration error printed as one line by one process
    per host and exit status 2 on every rank, without a traceback."""
    try:
        return main(argv)
    except ConfigError as e:
        if _reports_errors():
            print("configuration error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
