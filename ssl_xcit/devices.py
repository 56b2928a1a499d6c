"""Where computations run: one rule for every command."""

from __future__ import annotations

from typing import Optional, Union

import torch


def default_device(requested: Union[str, torch.device, None] = None, local_rank: Optional[int] = None) -> torch.device:
    """``requested`` if given, else the GPU when there is one (``cuda:local_rank`` under a
    launcher that starts one process per GPU), else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
