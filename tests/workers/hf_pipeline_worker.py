"""Worker for the HF pipeline test: a tiny HF model as a 4-stage CheckFree pipeline.

Every rank builds the engine from ``hf:DIR`` (each reads its own layers), runs one training step
on a fixed batch (its loss is computed with the checkpoint's weights), trains ``--steps`` more,
takes an evaluation loss with the final weights, exports the model, and saves what it owns.
"""
import argparse
import json
import os

import torch

from ds_checkfree.initialize import build
from ds_checkfree.models.hf import export_hf


def fixed_batches(path):
    """The same (inputs, labels) micro-batch forever: windows of T+1 tokens shifted by one."""
    window = torch.load(path)
    while True:
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--hf_dir", required=True)
    p.add_argument("--batch", required=True, help="a saved LongTensor [B, T+1]")
    p.add_argument("--export", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    engine, _ = build(cfg, f"hf:{args.hf_dir}")
    first_loss = float(engine.train_batch(fixed_batches(args.batch)))
    for _ in range(args.steps):
        engine.train_batch(fixed_batches(args.batch))
    final_loss = float(engine.eval_batch(fixed_batches(args.batch)))
    export_hf(engine, args.hf_dir, args.export)
    owned = {name: t.clone() for _, _, layer in engine.module.owned_layers() for name, t in layer.hf_state_dict().items()}
    os.makedirs(args.out, exist_ok=True)
    torch.save({"stage": engine.stage_id, "first_loss": first_loss, "final_loss": final_loss, "owned": owned},
               os.path.join(args.out, f"rank{torch.distributed.get_rank()}.pt"))
    # leave together: gloo threads still running at interpreter exit can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
