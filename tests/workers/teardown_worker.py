"""Worker for the teardown test: two pipeline engines in one process (world size 2), one
released as after a process loss; the other must keep training untouched."""
import json
import sys

import torch

from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_checkfree.data import build_data
from ds_checkfree.pipe.ds_private import release_engine
from ds_checkfree.initialize import build


def main():
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    dropped, setup = build(cfg, "tiny", {"num_layers": 4})
    kept, _ = build(cfg, "tiny", {"num_layers": 4}, engine_class=PipelineEngine)
    data = build_data(None, 32, kept.train_micro_batch_size_per_gpu(), seed=0)
    losses = [float(kept.train_batch(data.train.iterator(0)))]
    float(dropped.train_batch(data.train.iterator(0)))
    kept_grid, kept_module = kept.grid, kept.module
    release_engine(dropped)
    result = {"dropped_cleared": len(vars(dropped)) == 0,
              "kept_attrs": len(vars(kept)), "kept_grid_intact": len(vars(kept_grid)) > 0,
              "kept_tied_comms": kept_module.tied_comms is not None and kept_module._grid is kept_grid,
              "p2p_grid_is_kept": p2p._grid is kept_grid}
    losses.append(float(kept.train_batch(data.train.iterator(16))))  # still trains: groups and hooks intact
    result["kept_losses"] = losses
    if torch.distributed.get_rank() == 0:
        json.dump(result, open(out, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
