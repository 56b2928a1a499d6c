"""Reading what SLURM says about a partition: GPUs in GRES strings, and requests no node can hold."""

import pytest

from ssl_xcit.launch.slurm_info import gpus_in_gres, shortfall

NODES = ["0/16/0/16 64000 (null)", "0/16/0/16 64000 (null)", "0/64/0/64 512000 gpu:a100:8(S:0-1)"]


@pytest.mark.parametrize("gres,gpus", [("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("(null)", 0),
                                       ("gpu:a100:2,gpu:v100:2", 4), ("shard:8", 0)])
def test_gpus_in_gres(gres, gpus):
    assert gpus_in_gres(gres) == gpus


def test_a_request_some_nodes_hold_gets_no_warning():
    assert shortfall(NODES, nodes=2, cpus_per_node=12, mem_gb=32, gpus_per_node=0) is None
    assert shortfall(NODES, nodes=1, cpus_per_node=64, mem_gb=480, gpus_per_node=8) is None


@pytest.mark.parametrize("request_,names", [
    (dict(nodes=1, cpus_per_node=80, mem_gb=None, gpus_per_node=8), "80 CPUs"),
    (dict(nodes=2, cpus_per_node=16, mem_gb=None, gpus_per_node=8), "2 needed"),
    (dict(nodes=1, cpus_per_node=8, mem_gb=1000, gpus_per_node=0), "1000 GB"),
])
def test_a_request_no_node_holds_is_named(request_, names):
    reason = shortfall(NODES, **request_)
    assert reason is not None and names in reason and "largest node: 64 CPUs, 500 GB, 8 GPUs" in reason
