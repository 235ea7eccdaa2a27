"""What saving needs from torch.distributed: full tensors out of FSDP2 shards, one writer.

Under FSDP2 (``fully_shard``) a delta's tensors are ``DTensor`` shards. Gathering them is
a collective, so a save of a sharded delta must be called on every rank; rank 0 then
writes the one file. Unsharded tensors (one process, DDP) are written by whoever calls.
"""

from __future__ import annotations

import torch


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def gathered(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """``tensors`` with every ``DTensor`` gathered to its full value, and whether any was.

    Every rank must call this when any tensor is a ``DTensor`` (it is a collective).
    """
    dtensor = _dtensor_class()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors.values()):
        return tensors, False
    full = {}
    for key, tensor in tensors.items():
        full[key] = tensor.full_tensor() if isinstance(tensor, dtensor) else tensor
    return full, True


def writes(sharded: bool) -> bool:
    """Whether this process writes a file whose tensors were gathered (rank 0 only)."""
    if not sharded:
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def shaped_like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) as ``target`` holds it: this rank's shard of a ``DTensor``.

    Every rank must call this with the same full ``value`` (each keeps its own shard).
    """
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(target, dtensor) or isinstance(value, dtensor):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(value, target.device_mesh, target.placements)
