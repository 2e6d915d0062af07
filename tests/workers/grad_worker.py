"""Worker for the equivalence tests: one training step, gradients and loss saved per stage.

Gradients are captured inside the OptimizerStep instruction (after DeepSpeed has reduced
the tied replicas' gradients, before the update), through a re-declared instruction map:
the same extension mechanism the CheckFree engine itself relies on.
"""
import argparse
import json
import os

import torch

from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_checkfree.data import build_data
from ds_checkfree.pipe.engine import CheckFreePipelineEngine
from ds_checkfree.initialize import build


def _capture(engine):
    return {k: p.grad.detach().clone() for k, p in engine.module.recovery_state(True).items() if p.grad is not None}


class CapturingCheckFree(CheckFreePipelineEngine):
    def _exec_optimizer_step(self, lr_kwargs=None):
        self.captured = _capture(self)
        return CheckFreePipelineEngine._exec_optimizer_step(self, lr_kwargs)

    _INSTRUCTION_MAP = {**CheckFreePipelineEngine._INSTRUCTION_MAP, ds_schedule.OptimizerStep: _exec_optimizer_step}


class CapturingStock(PipelineEngine):
    def _exec_optimizer_step(self, lr_kwargs=None):
        self.captured = _capture(self)
        return PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, ds_schedule.OptimizerStep: _exec_optimizer_step}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--engine", choices=["checkfree", "stock"], default="checkfree")
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    cls = CapturingStock if args.engine == "stock" else CapturingCheckFree
    engine, setup = build(cfg, "tiny", {"num_layers": args.num_layers}, engine_class=cls)
    data = build_data(None, setup.model.max_seq_len, engine.train_micro_batch_size_per_gpu(), seed=0)
    params = {k: p.detach().clone() for k, p in engine.module.recovery_state(True).items()}
    loss = float(engine.train_batch(data.train.iterator(0)))
    os.makedirs(args.out, exist_ok=True)
    torch.save({"stage": engine.stage_id, "loss": loss, "grads": engine.captured, "params": params,
                "num_layers": setup.model.num_layers, "num_stages": engine.num_stages,
                "micro_batches": engine.micro_batches},
               os.path.join(args.out, f"stage{engine.stage_id}.pt"))
    # leave together: gloo threads still running at interpreter exit can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
