"""Where tensors that cross a process boundary live (ds_checkfree.pipe.devices): the pure rules,
and the helpers on a real one-rank gloo group."""
from __future__ import annotations

import pytest
import torch

from ds_checkfree.pipe.devices import (comm_device, comm_empty, comm_tensor, data_plane_backend, device_for_backend,
                                      object_to_tensor, pack_fp32, tensor_to_object, unpack_like)


@pytest.mark.parametrize("backend,accel,expected", [
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda", "cpu"),       # gloo on a GPU machine still wants host tensors
    ("mpi", "cuda", "cpu"),
    ("nccl", "cuda", "cuda"),      # the issue-#10 crash: CPU tensors handed to NCCL
    ("NCCL", "cuda", "cuda"),
    ("hccl", "hpu", "hpu"),
    ("cpu:gloo,cuda:nccl", "cuda", "cuda"),  # a per-device backend prefers the accelerator
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("cpu:gloo", "cuda", "cpu"),
])
def test_device_for_backend(backend, accel, expected):
    assert device_for_backend(backend, accel) == expected


@pytest.mark.parametrize("backend,accel,needle", [
    ("nccl", "cpu", "needs an accelerator"),
    ("smoke-signals", "cuda", "unknown process-group backend"),
    ("", "cuda", "empty"),
    ("cuda:", "cuda", "malformed"),
    ("xpu:xccl", "cuda", "serves neither"),
])
def test_device_for_backend_rejects(backend, accel, needle):
    with pytest.raises(ValueError, match=needle):
        device_for_backend(backend, accel)


def test_data_plane_backend():
    assert data_plane_backend("cpu") == "gloo"
    assert data_plane_backend("cuda") == "nccl"
    assert data_plane_backend(" CUDA ") == "nccl"
    with pytest.raises(ValueError, match="no data-plane backend"):
        data_plane_backend("tpu")


def test_helpers_follow_the_group_backend_and_round_trip_objects(monkeypatch, tmp_path):
    import torch.distributed as tdist
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert comm_device() == torch.device("cpu")
        t = comm_tensor([1.5, 2.5], torch.float64)
        assert t.device.type == "cpu" and t.dtype == torch.float64 and t.tolist() == [1.5, 2.5]
        z = comm_empty(3, torch.int64, zeros=True)
        assert z.tolist() == [0, 0, 0]
        tdist.all_reduce(t)  # usable by the group as built
        obj = {"a": torch.arange(4, dtype=torch.float32), "b": [1, "x"]}
        blob = object_to_tensor(obj, comm_device())
        assert blob.dtype == torch.uint8 and blob.device.type == "cpu"
        back = tensor_to_object(blob)
        assert torch.equal(back["a"], obj["a"]) and back["b"] == [1, "x"]
        # a stage's tensors as one fp32 message: bf16 values widen exactly, shapes and order come back
        state = {"w": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "s": torch.tensor(2.0)}
        flat = pack_fp32(state)
        assert flat.dtype == torch.float32 and flat.device.type == "cpu" and flat.numel() == 18
        tdist.all_reduce(flat)
        out = unpack_like(flat, state)
        assert list(out) == ["w", "b", "s"] and all(out[k].shape == state[k].shape for k in state)
        assert all(torch.equal(out[k], state[k].float()) for k in state)
        with pytest.raises(ValueError, match="18 values received for a template of 12"):
            unpack_like(flat, {"w": state["w"]})
    finally:
        tdist.destroy_process_group()
