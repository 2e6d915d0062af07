"""Where a tensor that crosses a process boundary must live, decided in one place.

Under NCCL (and the other accelerator collectives) every tensor handed to a collective or a
point-to-point call must sit on the accelerator: a CPU tensor fails with "No backend type
associated with device type cpu". Under gloo tensors live on the CPU. Every module that
builds a tensor to send or receive (gradient norms, shape metadata, recovery transfers, the
redundant baseline's buffers) asks ``comm_device(group)`` instead of calling ``.to()`` on its
own; the elastic launch asks ``data_plane_backend`` which backend to form its group with.

The decisions are pure functions of strings (``device_for_backend``, ``data_plane_backend``),
unit-tested without a process group; ``comm_device`` only looks up the group's backend and
the accelerator's current device.
"""
from __future__ import annotations

import torch

#: backends whose tensors live on the host
HOST_BACKENDS = frozenset({"gloo", "mpi", "ucc-cpu"})
#: backends whose tensors live on the accelerator
ACCELERATOR_BACKENDS = frozenset({"nccl", "hccl", "xccl", "cncl", "mccl"})
#: accelerator name (DeepSpeed's ``get_accelerator().device_name()``) -> its collective backend
_ACCELERATOR_DATA_PLANE = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl", "xpu": "xccl"}


def device_for_backend(backend: str, accelerator_device: str) -> str:
    """The device type (``"cpu"`` or the accelerator's) a tensor must be on for ``backend``.

    ``backend`` as ``torch.distributed.get_backend`` reports it: a single name (``"gloo"``,
    ``"nccl"``) or a per-device list such as ``"cpu:gloo,cuda:nccl"``, in which case the
    accelerator is preferred when the backend serves it (no host round trip).
    ``accelerator_device`` is the accelerator's device type (``"cuda"``) or ``"cpu"``.
    """
    name = str(backend).strip().lower()
    accel = str(accelerator_device).strip().lower()
    if not name:
        raise ValueError("empty backend name")
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        served = {}
        for part in name.split(","):
            dev, _, be = part.partition(":")
            if not be:
                raise ValueError(f"malformed backend {backend!r}: expected 'device:backend' pairs")
            served[dev.strip()] = be.strip()
        if accel in served:
            return accel
        if "cpu" in served:
            return "cpu"
        raise ValueError(f"backend {backend!r} serves neither {accel!r} nor 'cpu'")
    if name in HOST_BACKENDS:
        return "cpu"
    if name in ACCELERATOR_BACKENDS:
        if accel == "cpu":
            raise ValueError(f"backend {name!r} needs an accelerator, but the accelerator is 'cpu'")
        return accel
    raise ValueError(f"unknown process-group backend {backend!r}; known: "
                     f"{sorted(HOST_BACKENDS | ACCELERATOR_BACKENDS)}")


def data_plane_backend(accelerator_device: str) -> str:
    """The backend the elastic launch forms its data plane with: gloo on CPU, NCCL on CUDA."""
    accel = str(accelerator_device).strip().lower()
    try:
        return _ACCELERATOR_DATA_PLANE[accel]
    except KeyError:
        raise ValueError(f"no data-plane backend known for accelerator {accelerator_device!r}; known: "
                         f"{sorted(_ACCELERATOR_DATA_PLANE)}") from None


def _accelerator():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


def comm_device(group=None) -> torch.device:
    """The device for tensors sent or received over ``group`` (``None``: the default group)."""
    import torch.distributed as tdist
    accel = _accelerator()
    backend = tdist.get_backend(group) if tdist.is_initialized() else "gloo"
    kind = device_for_backend(backend, accel.device_name())
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(accel.current_device()))


def comm_tensor(data, dtype, group=None) -> torch.Tensor:
    """``torch.tensor(data, dtype)`` placed where ``group``'s backend wants it."""
    return torch.tensor(data, dtype=dtype, device=comm_device(group))


def comm_empty(shape, dtype, group=None, zeros: bool = False) -> torch.Tensor:
    """A receive buffer placed where ``group``'s backend wants it."""
    make = torch.zeros if zeros else torch.empty
    return make(shape, dtype=dtype, device=comm_device(group))


def object_to_tensor(obj, device) -> torch.Tensor:
    """A picklable object as a uint8 tensor on ``device`` (one host -> device copy in all)."""
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(device)


def tensor_to_object(blob: torch.Tensor, map_location=None):
    """The inverse of ``object_to_tensor``; tensors inside land on ``map_location``."""
    import io
    return torch.load(io.BytesIO(blob.cpu().numpy().tobytes()), map_location=map_location, weights_only=False)


def pack_fp32(state, group=None) -> torch.Tensor:
    """A stage's tensors (``name -> tensor``) as one fp32 vector where ``group``'s backend wants
    it: one message per transfer; fp32 weights and fp32 masters lose nothing, and under NCCL
    the parameters already sit on the accelerator (no host copy)."""
    device = comm_device(group)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in state.values()])


def unpack_like(flat: torch.Tensor, template) -> dict:
    """The inverse of ``pack_fp32``: views of ``flat`` shaped like ``template``'s tensors, in
    its order (kept in fp32: averaged in fp32, installed as fp32 masters or cast by the engine)."""
    out, offset = {}, 0
    for key, t in template.items():
        out[key] = flat[offset:offset + t.numel()].view(t.shape)
        offset += t.numel()
    if offset != flat.numel():
        raise ValueError(f"{flat.numel()} values received for a template of {offset}")
    return out

