"""Random-number-generator states of every process, for resuming a run bit for bit.

Only the model's own randomness (drop path) draws from these generators: augmentations
are seeded per sample by the sampler, and the data loader has a generator of its own.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def seed_all(seed: int) -> None:
    """Seed this process's torch (CPU and every CUDA device), NumPy and Python generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }


def _numpy_state_to_plain(state: tuple) -> tuple:
    """NumPy's state with its key array as a tensor: checkpoints load with weights_only."""
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def capture_all_ranks() -> list[dict[str, Any]]:
    """Every rank's state, in rank order (a collective: every rank must call it)."""
    mine = capture()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_own_rank(states: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's state when the checkpoint has one for it (same world size)."""
    if rank < len(states):
        restore(states[rank])
