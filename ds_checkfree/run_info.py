"""What a run writes about itself: run.json's contents and the progress line's pieces."""
from __future__ import annotations

import platform
import sys

import torch


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def replica_parameters(setup) -> int | None:
    """Extra parameters held because CheckFree+ replicates the head and tail (embedding, LM
    head): counted on the meta device; None when a layer cannot be built there."""
    if setup.checkfree.mode != "checkfree_plus":
        return 0
    parts = setup.model.parts()
    total = 0
    for spec in parts.head + parts.tail:
        try:
            with torch.device("meta"):
                total += sum(p.numel() for p in spec.build().parameters())
        except Exception:  # noqa: BLE001 - a layer class that loads weights at build
            return None
    return total


def failure_rate_label(cf) -> dict | None:
    """The configured failure rate in both units (per-step probability and %/h at the
    assumed step time), as run.json, the log and the failure events report it."""
    from ds_checkfree.recovery.injection import rate_label
    return rate_label(cf.failure_rate, cf.assumed_step_seconds, cf.failure_probability, cf.failure_preset)


def run_info(engine, setup, options, data, seq_len: int) -> dict:
    """run.json: resolved configuration, model, world layout, data and versions."""
    import deepspeed
    import transformers
    e = engine
    return {
        "argv": sys.argv, "args": options.as_dict(), "deepspeed_config": setup.ds_config,
        "checkfree": setup.checkfree.to_dict(), "model": setup.model.to_dict(),
        "model_parameters": setup.model.num_parameters(), "replica_parameters": replica_parameters(setup),
        "grad_norms_logged": {"grad_norm": setup.checkfree.grad_norm, "norm_scope": setup.checkfree.norm_scope,
                              "clip_scope": setup.checkfree.clip_scope},
        "failure_rate": failure_rate_label(setup.checkfree), "failure_draws": setup.checkfree.failure_draws,
        "layout": setup.checkfree.layout, "checkpoint_restore": setup.checkfree.checkpoint_restore,
        "world": {"world_size": setup.world_size, "num_stages": e.num_stages,
                  "dp_size": e.grid.get_data_parallel_world_size(), "micro_batches": e.micro_batches,
                  "micro_batch_size": e.train_micro_batch_size_per_gpu(),
                  "stage_layers": [[f"decoder{s.index}" if s.role == "decoder" else s.role + (f"{s.index}" if s.index else "")
                                    for s in stage]
                                   for stage in e.module.slots]},
        "data": {"source": data.source, "train_tokens": data.num_train_tokens, "val_tokens": data.num_val_tokens,
                 "seq_len": seq_len},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
        "engine": type(e).__name__,
    }


def announcement(engine, setup, steps: int, tokens_per_step: int) -> list[str]:
    """The lines a run starts with: what is trained, where, and what the replicas cost."""
    e, replica = engine, replica_parameters(setup)
    lines = [f"training {setup.model.name} ({setup.model.num_parameters() / 1e6:.2f}M params) on {e.num_stages} "
             f"stages x {e.grid.get_data_parallel_world_size()} replicas, mode {setup.checkfree.mode}, {steps} steps, "
             f"{tokens_per_step} tokens/step"]
    from ds_checkfree.recovery.injection import describe_rate
    label = failure_rate_label(setup.checkfree)
    if label is not None:
        lines.append(f"{describe_rate(label)}, drawn per {setup.checkfree.failure_draws.replace('_', ' ')}")
    if setup.checkfree.layout == "paper":
        lines.append(f"layout paper: embedding alone on stage 0, norm + head alone on stage {e.num_stages - 1} "
                     "(neither fails)")
    if replica:
        lines.append(f"CheckFree+ replicas: {replica} extra parameters ({replica * 4 / 1e6:.2f} MB fp32) on stages "
                     f"1 and {e.num_stages - 2}")
    return lines
