"""Worker for the private-member test: a real fp32 and a real bf16 pipeline engine in one
2-rank job, each trained one step, then every member ``ds_private.MEMBERS`` registers checked
on the objects it lives on (engine, module, grid, BF16_Optimizer, bf16 parameters, and the
output and hook manager of a forward through DeepSpeed's engine, as the routed forward runs it).
Each rank writes ``<out>.rank<r>.json``."""
import json
import sys

import torch
import torch.distributed as tdist
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_checkfree.data import build_data
from ds_checkfree.initialize import build
from ds_checkfree.pipe import ds_private


def check(engine) -> dict:
    data = build_data(None, 32, engine.train_micro_batch_size_per_gpu(), seed=0)
    loss = float(engine.train_batch(data.train.iterator(0)))
    objects = ds_private.built_objects(engine)
    owner_found = None
    if engine.is_first_stage():  # stage 0 takes token ids: a forward of one micro-batch hooks its output
        inputs = next(iter(data.train.iterator(0)))[0]
        output = DeepSpeedEngine.forward(engine, inputs)
        managers = getattr(output, "_backward_hook_managers", [])
        objects.update({"forward output": [output], "hook manager": list(managers)})
        owner_found = bool(managers) and all(ds_private.hook_owner(m) is engine for m in managers)
    return {"loss": loss, "bf16": bool(engine.bfloat16_enabled()), "kinds": sorted(k for k, v in objects.items() if v),
            "missing": ds_private.missing_on(objects), "hook_owner_is_engine": owner_found,
            "optimizer": type(engine.optimizer).__name__}


def main():
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    results = []
    for bf16 in (False, True):
        cfg["bf16"] = {"enabled": bf16}
        engine, _ = build(cfg, "tiny", {"num_layers": 4})
        results.append(check(engine))
        del engine
    rank = tdist.get_rank()
    json.dump(results, open(f"{out}.rank{rank}.json", "w"))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
