"""Redundant-computation baseline (Bamboo, NSDI'23): exact shadow copies in a ring.

Two variants, chosen by ``checkfree.redundant_forward``:

* ``true`` (default): **Bamboo's redundant computation.** On every training micro-batch the
  predecessor also runs the successor's forward pass, with the successor's weights (the
  shadow, built as real layers of the successor), on the very activation it sends to the
  successor (the last stage, whose successor in the ring is stage 0, runs the embedding
  stage on the micro-batch's input ids it loads anyway). The forward runs right after the
  stage's own forward, inside ``train_batch``, under ``torch.no_grad``: its cost is real
  compute on the critical path, measured in the step time (not charged). Bamboo schedules it
  into pipeline bubbles and keeps its activations for a lazy backward; here nothing overlaps
  (all ranks share the CPU cores) and only the output of the last micro-batch is kept.
  Memory: the successor's weights + optimizer state are held on top of one's own (x2).
* ``false``: **lower bound** ("gradient shipping only"): the same exact shadow, but no
  redundant forward; it costs one extra optimizer step and one gradient-sized message per
  step, less than any implementation of Bamboo.

Every stage ``i`` holds a *shadow* of its successor ``(i + 1) % S`` (a ring, so every stage
is covered, the first and the last included): the successor's weights and its optimizer
state (AdamW moments and step counts). The shadow is kept current every step:

1. just before the real optimizer step, a step pre-hook on the stage's optimizer copies
   the gradients the step is about to apply (after clipping) and the learning rate and
   weight decay of each parameter group into a send buffer;
2. after ``train_batch`` (``after_step``), each stage sends that buffer to its predecessor
   and receives its successor's (one gradient-sized message each way);
3. the predecessor applies an identical optimizer step (same class, same hyperparameters,
   same step count) to the shadow.

Same inputs, same kernel, one thread: the shadow equals the successor bit for bit, weights
and optimizer state (``tests/test_redundant.py`` checks this in a real 4-rank job).

When stage ``i`` is lost, its predecessor sends the shadow (weights + optimizer state) and
the new rank installs it: an exact restore, no rollback, no learning-rate change. The lost
node also held the shadow of ``i + 1``; the new rank rebuilds it from stage ``i + 1``'s live
state. Two ring-adjacent stages lost at once cannot be restored (the planner in
``ds_checkfree.recovery.rules`` then falls back to a checkpoint, if one is configured).

Costs, all measured per step and reported (``after_step`` returns them; ``summary`` gathers
the totals of every stage at the end of the run):
  * compute: one extra optimizer step over the successor's parameters;
  * communication: one gradient-sized message (plus a mask and the group hyperparameters);
  * memory: the successor's weights + optimizer state + two gradient buffers.
  * (``redundant_forward``) one extra forward of the successor's layers per micro-batch.
How the shadow is kept equal: Bamboo re-derives the successor's update from its own
redundant computation; shipping the successor's (clipped) gradients gives the same exact
weights for less, so both variants use it.

Hook API (called by ``ds_checkfree.trainer.Trainer``)::

    shadow = RedundantShadow(engine)          # after the engine is built (collective)
    extra = shadow.after_step()               # after every train_batch (collective)
    shadow.wipe()                             # on the rank whose stage was lost
    records = shadow.recover(actions, step)   # every rank, actions with method "redundant"
    summary = shadow.summary()                # at the end (collective)
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from ds_checkfree.pipe.devices import comm_device, comm_empty, comm_tensor, object_to_tensor, tensor_to_object
from ds_checkfree.recovery.apply import RecoveryRecord

# Message tags on the default process group (the pipeline's own traffic uses tag 0).
_TAG_GRAD, _TAG_HP, _TAG_LEN, _TAG_BLOB = 7101, 7102, 7103, 7104
_TAG_RESTORE, _TAG_RESHADOW = 0, 1  # offsets added to the blob tags for the two recovery messages

#: the recovery event's method: the lost stage is the replica that the shadow held
RECOVERY_METHOD = "replica_shadow"


@dataclass
class RedundantRecoveryRecord(RecoveryRecord):
    """A ``recovery`` event of the redundant baseline (exact restore from the predecessor's shadow)."""
    shadow_rebuilt_from: int = -1
    restore_bytes: int = 0
    reshadow_bytes: int = 0
    restore_seconds: float = 0.0
    reshadow_seconds: float = 0.0

    def as_event(self) -> dict:
        out = super().as_event()
        out.update({"shadow_rebuilt_from": self.shadow_rebuilt_from, "restore_bytes": int(self.restore_bytes),
                    "reshadow_bytes": int(self.reshadow_bytes), "restore_seconds": round(self.restore_seconds, 6),
                    "reshadow_seconds": round(self.reshadow_seconds, 6), "exact": True})
        return out


@dataclass
class _Totals:
    steps: int = 0
    comm_s: float = 0.0
    shadow_step_s: float = 0.0
    shadow_forward_s: float = 0.0
    shadow_forwards: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    per_step_s: list = field(default_factory=list)


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise NotImplementedError(
            f"checkfree.mode 'redundant' mirrors a plain torch optimizer step, but the engine's optimizer is "
            f"{type(opt).__name__} (a DeepSpeed wrapper: fp16/bf16/ZeRO). Fix: use fp32 without ZeRO and "
            "\"torch_adam\": true (or a torch optimizer).")
    return opt


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def shadow_layout_bytes(num_params: int, adam_moments: int = 2, bytes_per_value: int = 4) -> int:
    """Expected steady-state memory of one shadow: weights + Adam moments + 2 gradient buffers."""
    return num_params * bytes_per_value * (1 + adam_moments + 2)


def _to_blob(obj) -> torch.Tensor:
    return object_to_tensor(obj, comm_device())


def _from_blob(blob: torch.Tensor):
    return tensor_to_object(blob)


def ring_exchange(sends, dst: int, recvs, src: int) -> None:
    """Send ``sends`` to ``dst`` while receiving ``recvs`` from ``src``, every rank at once.

    Every stage sends to its predecessor and receives from its successor, a cycle. Under NCCL a
    lone send blocks until its peer posts the matching receive, and unbatched p2p ops on one
    group run one after another, so "isend then recv" on every rank waits around the ring for
    ever (seen on an H200: the redundant baseline hung before step 1). One batched call (one NCCL
    group) posts both directions together; gloo accepts the same call. ``sends`` / ``recvs`` are
    (tensor, tag) pairs, matched in order.
    """
    ops = [tdist.P2POp(tdist.isend, t, dst, tag=tag) for t, tag in sends]
    ops += [tdist.P2POp(tdist.irecv, t, src, tag=tag) for t, tag in recvs]
    for req in tdist.batch_isend_irecv(ops):
        req.wait()


def _send_blob(obj, dst: int, tag_offset: int = 0) -> int:
    blob = _to_blob(obj)
    tdist.send(comm_tensor([blob.numel()], torch.int64), dst, tag=_TAG_LEN + 10 * tag_offset)
    tdist.send(blob, dst, tag=_TAG_BLOB + 10 * tag_offset)
    return blob.numel() + 8


def _recv_blob(src: int, tag_offset: int = 0):
    n = comm_empty(1, torch.int64, zeros=True)
    tdist.recv(n, src, tag=_TAG_LEN + 10 * tag_offset)
    blob = comm_empty(int(n), torch.uint8)
    tdist.recv(blob, src, tag=_TAG_BLOB + 10 * tag_offset)
    return _from_blob(blob), int(n) + 8


class RedundantShadow:
    """This rank's shadow of its successor stage, and the hooks that keep and use it."""

    def __init__(self, engine, elastic: bool = False, redundant_forward: bool | None = None):
        if elastic:
            raise NotImplementedError("checkfree.mode 'redundant' is not wired into the fault-tolerant MPI launch "
                                      "(a rebuilt engine has a new optimizer). Fix: use the deepspeed/torchrun "
                                      "launch with logical failures.")
        self.engine = engine
        grid = engine.grid
        S = engine.num_stages
        if S < 2:
            raise ValueError(f"mode 'redundant' needs at least 2 stages, got {S}")
        self.num_stages, self.stage, self.dp = S, engine.stage_id, grid.get_data_parallel_id()
        self.pred_stage, self.succ_stage = (self.stage - 1) % S, (self.stage + 1) % S
        self.pred_rank = grid.stage_to_global(stage_id=self.pred_stage, data=self.dp)
        self.succ_rank = grid.stage_to_global(stage_id=self.succ_stage, data=self.dp)
        self.opt = _base_optimizer(engine)
        self._params = [p for g in self.opt.param_groups for p in g["params"]]
        if redundant_forward is None:
            redundant_forward = getattr(getattr(engine, "checkfree", None), "redundant_forward", True)
        self.redundant_forward = bool(redundant_forward)
        names = {id(p): n for n, p in engine.module.named_parameters()}
        self._names = [names.get(id(p)) for p in self._params]
        #: Bamboo variant: the successor's layers (the shadow's parameters are theirs)
        self.shadow_module: torch.nn.Module | None = None
        self.shadow_layers: list[torch.nn.Module] = []
        self._pending_inputs: deque = deque()  # last stage: micro-batch inputs for stage 0's shadow
        self._step_forwards, self._step_forward_s = 0, 0.0
        self.last_shadow_forward: dict | None = None  # input/output of the last redundant forward
        self.last_own_output: torch.Tensor | None = None  # this stage's own output, same micro-batch
        self._hooks = []
        if self.redundant_forward:
            self._install_forward_hooks()
        for p in self._params:
            if p.dtype != torch.float32:
                raise NotImplementedError(f"mode 'redundant' ships fp32 gradients; found a {p.dtype} parameter")
        numel = sum(p.numel() for p in self._params)
        self._grad_out = comm_empty(numel + len(self._params), torch.float32, zeros=True)  # grads, then a 0/1 mask
        self._hp_out = comm_empty(1 + 2 * len(self.opt.param_groups), torch.float64, zeros=True)  # stepped, (lr, wd)*
        self._hook = self.opt.register_step_pre_hook(self._capture)
        self.totals = _Totals()
        self.shadow_params: list[torch.nn.Parameter] = []
        self.shadow_opt: torch.optim.Optimizer | None = None
        t0 = time.perf_counter()
        self._bootstrap()
        self.setup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ state
    def own_state(self) -> dict:
        """This stage's exact training state: parameter shapes per group, weights, optimizer state."""
        return {"stage": self.stage, "shapes": [[tuple(p.shape) for p in g["params"]] for g in self.opt.param_groups],
                "names": self._names, "weights": [p.detach() for p in self._params],
                "optimizer": self.opt.state_dict()}

    def shadow_state(self) -> dict:
        """The shadow, in the same form as the successor's ``own_state``."""
        return {"stage": self.succ_stage, "shapes": self._shadow_shapes, "names": self._shadow_names,
                "weights": [p.detach() for p in self.shadow_params], "optimizer": self.shadow_opt.state_dict()}

    def _install_shadow(self, state: dict) -> None:
        if state["stage"] != self.succ_stage:
            raise RuntimeError(f"stage {self.stage} expected its successor {self.succ_stage}'s state, "
                               f"got stage {state['stage']}'s")
        self._shadow_shapes = state["shapes"]
        self._shadow_names = list(state.get("names") or [None] * len(state["weights"]))
        weights = iter(state["weights"])
        names = iter(self._shadow_names)
        layer_params = self._successor_layer_params() if self.redundant_forward else None
        groups = []
        self.shadow_params = []
        for shapes in state["shapes"]:
            ps = []
            for _ in shapes:
                w, name = next(weights).detach(), next(names)
                if layer_params is None:
                    ps.append(torch.nn.Parameter(w.clone()))
                    continue
                if name not in layer_params:
                    raise RuntimeError(f"stage {self.stage}: the successor's parameter {name!r} is not in the "
                                       f"shadow layers built for stage {self.succ_stage} ({sorted(layer_params)})")
                p = layer_params[name]
                with torch.no_grad():
                    p.copy_(w)
                ps.append(p)
            self.shadow_params.extend(ps)
            groups.append({"params": ps})
        self.shadow_opt = type(self.opt)(groups)
        self.shadow_opt.load_state_dict(state["optimizer"])  # hyperparameters per group + exact moments
        numel = sum(p.numel() for p in self.shadow_params)
        self._grad_in = comm_empty(numel + len(self.shadow_params), torch.float32, zeros=True)
        self._hp_in = comm_empty(1 + 2 * len(groups), torch.float64, zeros=True)
        self._grad_views, offset = [], 0
        for p in self.shadow_params:
            self._grad_views.append(self._grad_in[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        self._mask_in = self._grad_in[offset:]

    # ------------------------------------------------------------------ redundant forward
    def _successor_layer_params(self) -> dict[str, torch.nn.Parameter]:
        """The successor's layers, built once on this rank (same specs, same global layer
        names as on the successor), by parameter name; their weights are overwritten next."""
        if self.shadow_module is None:
            m = self.engine.module
            container = torch.nn.Module()
            first = m.parts[self.succ_stage]
            for k, slot in enumerate(m.slots[self.succ_stage]):
                layer = m.spec_for(slot).build()
                container.add_module(str(first + k), layer)
                self.shadow_layers.append(layer)
            self.shadow_module = container.to(self.engine.device)
            self.shadow_module.train()
        return dict(self.shadow_module.named_parameters())

    def _install_forward_hooks(self) -> None:
        engine = self.engine
        self._hooks.append(engine.module.register_forward_hook(self._on_forward))
        if self.succ_stage == 0:
            # The last stage loads every micro-batch (for its labels); stage 0's shadow needs the
            # inputs of the same micro-batch. An instance attribute shadows PipelineEngine._next_batch.
            load = engine._next_batch

            def next_batch():
                batch = load()
                if engine.module.training:
                    self._pending_inputs.append(batch[0])
                return batch
            engine._next_batch = next_batch

    def _on_forward(self, module, inputs, output) -> None:
        """After this stage's own forward of a training micro-batch: the successor's forward."""
        if not module.training or self.shadow_module is None:
            return
        if self.succ_stage == 0:
            if not self._pending_inputs:
                raise RuntimeError("redundant forward: no loaded micro-batch for stage 0's shadow")
            x = self._pending_inputs.popleft()
            x = x.to(self.engine.device) if torch.is_tensor(x) else x
        else:
            x = output
        t0 = time.perf_counter()
        with torch.no_grad():
            y = x.detach() if torch.is_tensor(x) else x
            for layer in self.shadow_layers:
                y = layer(y)
        dt = time.perf_counter() - t0
        self._step_forwards += 1
        self._step_forward_s += dt
        self.totals.shadow_forwards += 1
        self.totals.shadow_forward_s += dt
        self.last_shadow_forward = {"input": x.detach(), "output": y}
        self.last_own_output = output.detach()

    def _install_own(self, state: dict) -> None:
        if state["stage"] != self.stage:
            raise RuntimeError(f"stage {self.stage} received stage {state['stage']}'s shadow")
        with torch.no_grad():
            for p, w in zip(self._params, state["weights"], strict=True):
                p.copy_(w)
                p.grad = None
        # keep the current hyperparameters (a scheduler owns the lr); take moments and step counts
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.opt.load_state_dict(state["optimizer"])
        for g, h in zip(self.opt.param_groups, hyper):
            g.update(h)

    def _bootstrap(self) -> None:
        """Every stage sends its state to its predecessor and builds the shadow of its successor."""
        if self.dp is None:
            raise RuntimeError("no data-parallel id")
        blob = _to_blob(self.own_state())
        m = comm_empty(1, torch.int64, zeros=True)
        ring_exchange([(comm_tensor([blob.numel()], torch.int64), _TAG_LEN)], self.pred_rank,
                      [(m, _TAG_LEN)], self.succ_rank)
        other = comm_empty(int(m), torch.uint8)
        ring_exchange([(blob, _TAG_BLOB)], self.pred_rank, [(other, _TAG_BLOB)], self.succ_rank)
        self._install_shadow(_from_blob(other))

    def resync(self) -> None:
        """Rebuild every shadow from the live state (after a checkpoint rollback; collective)."""
        self._bootstrap()

    # ------------------------------------------------------------------ every step
    def _capture(self, optimizer, args, kwargs) -> None:
        """Step pre-hook of the real optimizer: the exact gradients and hyperparameters of this step."""
        offset, nparams = 0, len(self._params)
        numel = self._grad_out.numel() - nparams
        for i, p in enumerate(self._params):
            n = p.numel()
            if p.grad is None:
                self._grad_out[offset:offset + n].zero_()
                self._grad_out[numel + i] = 0.0
            else:
                self._grad_out[offset:offset + n].copy_(p.grad.detach().reshape(-1))
                self._grad_out[numel + i] = 1.0
            offset += n
        self._hp_out[0] = 1.0
        for j, g in enumerate(optimizer.param_groups):
            self._hp_out[1 + 2 * j] = float(g["lr"])
            self._hp_out[2 + 2 * j] = float(g.get("weight_decay", 0.0))

    def after_step(self) -> dict:
        """Ship this step's gradients to the predecessor; step the shadow with the successor's."""
        t0 = time.perf_counter()
        ring_exchange([(self._grad_out, _TAG_GRAD), (self._hp_out, _TAG_HP)], self.pred_rank,
                      [(self._grad_in, _TAG_GRAD), (self._hp_in, _TAG_HP)], self.succ_rank)
        self._hp_out[0] = 0.0  # a step that the real optimizer skips is skipped on the shadow too
        t1 = time.perf_counter()
        if float(self._hp_in[0]) == 1.0:
            for p, view, has in zip(self.shadow_params, self._grad_views, self._mask_in.tolist()):
                p.grad = view if has else None
            for j, g in enumerate(self.shadow_opt.param_groups):
                g["lr"] = float(self._hp_in[1 + 2 * j])
                if "weight_decay" in g:
                    g["weight_decay"] = float(self._hp_in[2 + 2 * j])
            self.shadow_opt.step()
            for p in self.shadow_params:
                p.grad = None
        t2 = time.perf_counter()
        fwd_n, fwd_s = self._step_forwards, self._step_forward_s
        self._step_forwards, self._step_forward_s = 0, 0.0
        sent = _nbytes(self._grad_out) + _nbytes(self._hp_out)
        received = _nbytes(self._grad_in) + _nbytes(self._hp_in)
        tot = self.totals
        tot.steps += 1
        tot.comm_s += t1 - t0
        tot.shadow_step_s += t2 - t1
        tot.bytes_sent += sent
        tot.bytes_received += received
        tot.per_step_s.append(t2 - t0 + fwd_s)
        # "seconds": everything the baseline added to this step (the forwards ran inside train_batch)
        return {"comm_s": round(t1 - t0, 6), "shadow_step_s": round(t2 - t1, 6),
                "shadow_forwards": fwd_n, "shadow_forward_s": round(fwd_s, 6),
                "seconds": round(t2 - t0 + fwd_s, 6), "redundant_forward": self.redundant_forward,
                "bytes_sent": sent, "bytes_received": received, "memory_bytes": self.memory_bytes()}

    # ------------------------------------------------------------------ accounting
    def memory_bytes(self) -> dict:
        weights = sum(_nbytes(p) for p in self.shadow_params)
        optim = _state_bytes(self.shadow_opt) if self.shadow_opt is not None else 0
        buffers = sum(_nbytes(t) for t in (self._grad_out, self._hp_out, self._grad_in, self._hp_in))
        return {"shadow_weights": weights, "shadow_optimizer": optim, "buffers": buffers,
                "total": weights + optim + buffers}

    def local_summary(self) -> dict:
        tot = self.totals
        own = sum(_nbytes(p) for p in self._params)
        per = sorted(tot.per_step_s)
        return {"stage": self.stage, "dp": self.dp, "shadow_of": self.succ_stage, "steps": tot.steps,
                "shadow_parameters": sum(p.numel() for p in self.shadow_params),
                "own_parameters": sum(p.numel() for p in self._params),
                "own_weight_bytes": own, "own_optimizer_bytes": _state_bytes(self.opt),
                "memory_bytes": self.memory_bytes(), "setup_seconds": round(self.setup_seconds, 6),
                "redundant_forward": self.redundant_forward, "shadow_forwards": tot.shadow_forwards,
                "shadow_forward_s_total": round(tot.shadow_forward_s, 6),
                "comm_s_total": round(tot.comm_s, 6), "shadow_step_s_total": round(tot.shadow_step_s, 6),
                "seconds_per_step_mean": round((tot.comm_s + tot.shadow_step_s + tot.shadow_forward_s)
                                               / max(tot.steps, 1), 6),
                "seconds_per_step_median": round(per[len(per) // 2], 6) if per else 0.0,
                "bytes_sent_total": tot.bytes_sent, "bytes_received_total": tot.bytes_received,
                "bytes_sent_per_step": tot.bytes_sent // max(tot.steps, 1)}

    def summary(self) -> list[dict]:
        """Every rank's ``local_summary`` (a collective: all ranks call it)."""
        out = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, self.local_summary())
        return sorted(out, key=lambda s: (s["dp"], s["stage"]))

    # ------------------------------------------------------------------ failures
    def wipe(self, seed: int = 0) -> None:
        """The lost node's shadow is gone too: random weights, no optimizer state."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.shadow_params:
                p.copy_(torch.randn(p.shape, generator=gen))
        self.shadow_opt.state.clear()
        self._grad_out.zero_()
        self._hp_out.zero_()
        self._pending_inputs.clear()
        self.last_shadow_forward = self.last_own_output = None

    def dump(self, directory: str, step: int, tag: str) -> str:
        """Debug aid for tests: exact own and shadow state of this rank."""
        import os
        path = os.path.join(directory, f"step{step}_stage{self.stage}_dp{self.dp}_{tag}_redundant.pt")
        torch.save({"own": self.own_state(), "shadow": self.shadow_state(), "shadow_of": self.succ_stage,
                    "shadow_forwards": self.totals.shadow_forwards, "last_shadow_forward": self.last_shadow_forward,
                    "last_own_output": self.last_own_output}, path)
        return path

    def recover(self, actions, step: int) -> list[RedundantRecoveryRecord]:
        """Restore each lost stage exactly from its predecessor's shadow; rebuild its own shadow.

        Every rank calls this with the same actions in the same order (blocking messages pair up)."""
        grid = self.engine.grid
        me, my_dp, S = self.engine.global_rank, self.dp, self.num_stages
        records = []
        for action in actions:
            if action.method != "redundant":
                raise ValueError(f"RedundantShadow.recover got a {action.method!r} action")
            lost = action.stage
            holder_stage, succ_stage = (lost - 1) % S, (lost + 1) % S
            for dp in range(grid.get_data_parallel_world_size()):
                target = grid.stage_to_global(stage_id=lost, data=dp)
                holder = grid.stage_to_global(stage_id=holder_stage, data=dp)
                succ = grid.stage_to_global(stage_id=succ_stage, data=dp)
                if dp == my_dp and me == holder:
                    _send_blob(self.shadow_state(), target, _TAG_RESTORE)
                if dp == my_dp and me == succ:
                    _send_blob(self.own_state(), target, _TAG_RESHADOW)
                record = None
                if me == target:
                    t0 = time.perf_counter()
                    state, restore_bytes = _recv_blob(holder, _TAG_RESTORE)
                    self._install_own(state)
                    t1 = time.perf_counter()
                    state, reshadow_bytes = _recv_blob(succ, _TAG_RESHADOW)
                    self._install_shadow(state)
                    t2 = time.perf_counter()
                    self.engine.reset_lr_scale()  # an exact restore: nothing to compensate
                    record = RedundantRecoveryRecord(
                        stage=lost, method=RECOVERY_METHOD, sources=[holder_stage], weights=[1.0],
                        seconds=t2 - t0, bytes_received=restore_bytes + reshadow_bytes, lr_scale=1.0,
                        shadow_rebuilt_from=succ_stage, restore_bytes=restore_bytes,
                        reshadow_bytes=reshadow_bytes, restore_seconds=t1 - t0, reshadow_seconds=t2 - t1)
                box = [record]
                tdist.broadcast_object_list(box, src=target)
                if dp == 0:
                    records.append(box[0])
        return records
