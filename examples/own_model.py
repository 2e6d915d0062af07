"""Your own model and your own loop, made fault-tolerant with ds-checkfree.

A GPT-2-style block in plain PyTorch, described to DeepSpeed as LayerSpecs and split for
CheckFree into head (embeddings) | blocks (averaged on recovery) | tail (norm + LM head).

    deepspeed --num_gpus 4 examples/own_model.py --deepspeed_config ds_configs/checkfree.json
    mpirun --with-ft ulfm --oversubscribe --map-by slot --bind-to none -n 5 \
        python examples/own_model.py --deepspeed_config ds_configs/checkfree.json --spares 1

Under the first launcher failures are logical (``--fail_at STAGE:STEP``); under the second a
real process death is survived: the spare (the 5th rank) takes the lost stage's place.
``--hf DIR`` trains a local Hugging Face model (Llama, Mistral, Qwen2, GPT-2) with the same loop.
"""
import argparse
import json

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec
from torch import nn

import ds_checkfree

VOCAB, DIM, HEADS, SEQ = 256, 64, 4, 32


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)

    def forward(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP: the layer CheckFree averages between neighbours."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.out = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x):
        return self.out(self.ln(x))


def loss_fn(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def batches(step, micro_batches, micro_batch_size, vocab=VOCAB):
    """Deterministic toy data: each step's micro-batches are a function of the step alone, so
    the loop can resume its data wherever the manager says."""
    g = torch.Generator().manual_seed(step)
    for _ in range(micro_batches):
        ids = torch.randint(0, vocab, (micro_batch_size, SEQ + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--spares", type=int, default=0, help="ranks beyond the stages (mpirun --with-ft ulfm only)")
    p.add_argument("--fail_at", action="append", default=[], help="STAGE:STEP, a logical failure")
    p.add_argument("--hf", default=None, metavar="DIR", help="a local Hugging Face model instead of the toy layers")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    config["checkfree"].update(spares=args.spares, fail_at=args.fail_at)

    if args.hf:
        model = f"hf:{args.hf}"  # split into head / blocks / tail by ds-checkfree, weights loaded per stage
    else:
        model = ds_checkfree.PipelineParts(head=[LayerSpec(Embed)], blocks=[LayerSpec(Block) for _ in range(args.blocks)],
                                           tail=[LayerSpec(Head)], loss_fn=loss_fn, name="toy-gpt")
    ft = ds_checkfree.Manager.start(config, model=model, output_dir=args.output_dir)
    vocab = getattr(ft.setup.model, "vocab_size", None) or VOCAB
    step = ft.start_step
    while ft.engine is not None and step <= args.steps:
        step = ft.begin(step)  # logical failures due now; a rollback moves the step
        engine = ft.engine
        data = batches(step, engine.micro_batches, engine.train_micro_batch_size_per_gpu(), vocab)
        loss = ft.run(step, lambda e: float(e.train_batch(data)))
        if loss is None:  # a peer died: the job was rebuilt around a new engine
            step = ft.resume_step
            continue
        ft.completed(step, loss)
        ft.log(f"step {step} loss {loss:.4f}")
        step += 1
    ft.finish(args.steps)
    ft.exit(0)


if __name__ == "__main__":
    main()
