"""Features shared by two CPU processes (gloo): each computes its contiguous share, one gather
gives every rank all rows in dataset order."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from ssl_xcit.eval import sharded_export
from ssl_xcit.eval.sharded_export import compute_features_sharded


def _images(num_rows: int) -> TensorDataset:
    """(num_rows, 3, 2, 2) images whose 'feature' under nn.Flatten is their 12 pixels."""
    x = torch.arange(num_rows * 12, dtype=torch.float32).reshape(num_rows, 3, 2, 2)
    return TensorDataset(x, torch.arange(num_rows) * 7 + 3)


def _rank(rank: int, port: int, out: str, sizes: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    computed = []
    compute = sharded_export.compute_features

    def counting(model, dataset, **kwargs):
        computed.append(len(dataset))
        return compute(model, dataset, **kwargs)

    sharded_export.compute_features = counting
    results = [compute_features_sharded(torch.nn.Flatten(), _images(n), torch.device("cpu"), batch_size=3,
                                        num_workers=0) for n in sizes]
    torch.save({"results": results, "computed": computed}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing torch
def test_two_processes_share_the_rows_and_both_get_all_of_them(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [7, 1]  # shards of 4 and 3 rows; of 1 and 0 rows (fewer rows than ranks)
    mp.spawn(_rank, args=(port, str(tmp_path), sizes), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # each rank computed its share only; the rank without rows computes one row it drops
    assert ranks[0]["computed"] == [4, 1] and ranks[1]["computed"] == [3, 1]
    for rank in ranks:
        for n, (features, labels) in zip(sizes, rank["results"]):
            assert features.dtype == np.float32 and labels.dtype == np.int64
            np.testing.assert_array_equal(features, np.arange(n * 12, dtype=np.float32).reshape(n, 12))
            np.testing.assert_array_equal(labels, np.arange(n) * 7 + 3)


def test_outside_torch_distributed_no_collective_is_called(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a collective outside torch.distributed")

    monkeypatch.setattr(dist, "all_gather", refuse)
    features, labels = compute_features_sharded(torch.nn.Flatten(), _images(5), torch.device("cpu"), num_workers=0)
    np.testing.assert_array_equal(features, np.arange(60, dtype=np.float32).reshape(5, 12))
    np.testing.assert_array_equal(labels, np.arange(5) * 7 + 3)
