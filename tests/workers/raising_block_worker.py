"""A user loop (Manager) whose block raises a non-communication error on one stage.

``--raise_block B --raise_at_call N``: block B's N-th forward raises ``torch.OutOfMemoryError``
(what a real out-of-memory raises), on whichever rank holds it. The job must stop once with
that reason, not take the exit for a lost peer and re-agree.
"""
import argparse
import json

import torch
from deepspeed.pipe import LayerSpec

import ds_checkfree
from examples.own_model import Block, Embed, Head, batches, loss_fn


class RaisingBlock(Block):
    def __init__(self, index: int, raise_block: int, raise_at_call: int):
        super().__init__()
        self.index, self.raise_block, self.raise_at_call, self.calls = index, raise_block, raise_at_call, 0

    def forward(self, x):
        self.calls += 1
        if self.index == self.raise_block and self.calls == self.raise_at_call:
            raise torch.OutOfMemoryError(f"injected: block {self.index} out of memory at forward {self.calls}")
        return super().forward(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--raise_block", type=int, default=2)
    p.add_argument("--raise_at_call", type=int, default=20)
    args = p.parse_args()
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    parts = ds_checkfree.PipelineParts(
        head=[LayerSpec(Embed)], tail=[LayerSpec(Head)], loss_fn=loss_fn,
        blocks=[LayerSpec(RaisingBlock, i, args.raise_block, args.raise_at_call) for i in range(4)])
    ft = ds_checkfree.Manager.start(config, model=parts, output_dir=args.output_dir)
    step = ft.start_step
    while ft.engine is not None and step <= args.steps:
        step = ft.begin(step)
        engine = ft.engine
        data = batches(step, engine.micro_batches, engine.train_micro_batch_size_per_gpu())
        loss = ft.run(step, lambda e: float(e.train_batch(data)))
        if loss is None:
            step = ft.resume_step
            continue
        ft.completed(step, loss)
        step += 1
    ft.finish(args.steps)
    ft.exit(0)


if __name__ == "__main__":
    main()
