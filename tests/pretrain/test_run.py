"""The Trainer settings derived from the config."""

import pytest
import torch

from ssl_xcit.pretrain.config import PretrainConfig, TrainerConfig
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.run import precision, sync_batchnorm, world_size

GPU = torch.cuda.is_available()


def cfg(**trainer) -> PretrainConfig:
    return PretrainConfig(trainer=TrainerConfig(**trainer))


def test_precision_is_fp32_on_cpu_and_bf16_on_gpu():
    assert precision(cfg(accelerator="cpu")) == "32-true"
    assert precision(cfg(accelerator="gpu")) == "bf16-mixed"
    assert precision(cfg(accelerator="cpu", precision="bf16-mixed")) == "bf16-mixed"
    assert precision(cfg(accelerator="auto")) == ("bf16-mixed" if GPU else "32-true")


def test_world_size_counts_processes_over_nodes():
    assert world_size(cfg(accelerator="cpu", devices=2, num_nodes=3)) == 6
    assert world_size(cfg(accelerator="cpu", devices="auto")) == 1


def test_sync_batchnorm_only_for_several_gpus():
    assert sync_batchnorm(cfg(accelerator="gpu", devices=8, num_nodes=2))
    assert not sync_batchnorm(cfg(accelerator="gpu", devices=1))
    assert not sync_batchnorm(cfg(accelerator="cpu", devices=2))
    with pytest.raises(UserError, match="trainer.sync_batchnorm: SyncBatchNorm needs GPUs"):
        sync_batchnorm(cfg(accelerator="cpu", devices=2, sync_batchnorm=True))
