"""Where computations run: one rule for every command."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

from ssl_xcit.errors import UserError


def default_device(requested: Union[str, torch.device, None] = None, local_rank: Optional[int] = None) -> torch.device:
    """``requested`` if given, else the GPU when there is one (``cuda:local_rank`` under a
    launcher that starts one process per GPU), else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")


def bind_local_gpu(environ: Mapping[str, str] = os.environ) -> Optional[torch.device]:
    """Make ``cuda:LOCAL_RANK`` this process's current device when a launcher (torchrun, or
    Lightning's per-GPU processes) set ``LOCAL_RANK`` and CUDA is available; else do nothing.

    Everything that says "cuda" without an index (pinned memory, FAISS, ``default_device``)
    then lands on the process's own GPU instead of all ranks crowding GPU 0. A process that
    sees a single GPU (a launcher that hides the others) is bound to that one.

    Returns:
        The bound device, or None when nothing was bound.

    Raises:
        UserError: LOCAL_RANK names a GPU the process cannot see.
    """
    local_rank = environ.get("LOCAL_RANK")
    if local_rank is None or not torch.cuda.is_available():
        return None
    visible = torch.cuda.device_count()
    index = 0 if visible == 1 else int(local_rank)
    if index >= visible:
        raise UserError(f"LOCAL_RANK={local_rank} names a GPU this process cannot see ({visible} visible)")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device
