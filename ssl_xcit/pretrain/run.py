"""``ssl-xcit pretrain``: the Trainer, callbacks and run folder around :class:`DINOModule`."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import ClusterEnvironment
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ssl_xcit.files import atomic_write_text
from ssl_xcit.pretrain.bad_images import BadImagePolicy
from ssl_xcit.pretrain.checkpointing import LAST, AtomicCheckpointIO, RunCheckpoints, last_checkpoint
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.pretrain.data import PretrainDataModule
from ssl_xcit.errors import RunStopped, UserError
from ssl_xcit.pretrain.init_weights import init_module
from ssl_xcit.pretrain.knn_monitor import monitor_callbacks
from ssl_xcit.pretrain.loggers import build_loggers
from ssl_xcit.pretrain.module import DINOModule
from ssl_xcit.pretrain.stop import StopController, StopReason


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def world_size(cfg: PretrainConfig) -> int:
    """Processes the run will use (devices per node × nodes)."""
    devices = cfg.trainer.devices
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if uses_gpu(cfg.trainer.accelerator) else 1
    return int(devices) * cfg.trainer.num_nodes


def precision(cfg: PretrainConfig) -> str:
    """bf16 mixed precision on GPU, fp32 on CPU, unless the config says otherwise."""
    if cfg.trainer.precision is not None:
        return cfg.trainer.precision
    return "bf16-mixed" if uses_gpu(cfg.trainer.accelerator) else "32-true"


def sync_batchnorm(cfg: PretrainConfig) -> bool:
    """SyncBatchNorm whenever several GPUs train together (XCiT has BatchNorm).

    torch implements SyncBatchNorm for GPUs only: on CPU each process normalises its own
    batch, and asking for it is refused.
    """
    gpu = uses_gpu(cfg.trainer.accelerator)
    if cfg.trainer.sync_batchnorm and not gpu:
        raise UserError("trainer.sync_batchnorm: SyncBatchNorm needs GPUs; on CPU leave it unset or false")
    if cfg.trainer.sync_batchnorm is not None:
        return cfg.trainer.sync_batchnorm
    return gpu and world_size(cfg) > 1


class LoggingCadenceProgressBar(TQDMProgressBar):
    """Lightning's progress bar, refreshed only at the logging steps and epoch ends: its refresh
    reads the logged values back from the device, which would make every step wait for it."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0 or batch_idx + 1 == trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def build_trainer(
    cfg: PretrainConfig,
    run_dir: Path,
    extra_callbacks: Optional[list[Any]] = None,
    environment: Optional[ClusterEnvironment] = None,
) -> pl.Trainer:
    """The Trainer of a run; ``environment`` overrides Lightning's cluster detection."""
    t = cfg.trainer
    bar = [LoggingCadenceProgressBar()] if t.enable_progress_bar else []
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision(cfg),
        sync_batchnorm=sync_batchnorm(cfg),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        benchmark=True if uses_gpu(t.accelerator) and not t.deterministic else None,  # fixed crop sizes: cudnn picks once
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False,  # RunCheckpoints writes every checkpoint; Lightning would add its own
        use_distributed_sampler=False,  # ours is distributed and resumable mid-epoch
        callbacks=list(extra_callbacks or []) + bar,
        logger=build_loggers(t.logger, run_dir),
        plugins=[AtomicCheckpointIO()] + ([environment] if environment is not None else []),
        default_root_dir=run_dir,
    )


def resume_checkpoint(cfg: PretrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from, or None for a fresh run."""
    last = last_checkpoint(run_dir / "checkpoints")
    if last is not None and not cfg.run.resume:
        raise UserError(
            f"run.dir: {run_dir} already holds {last.name}; resume it (--run.resume true) or choose another --run.dir"
        )
    return last


@contextmanager
def _expected_notices_silenced() -> Iterator[None]:
    """Lightning notices that are false here, silenced while the run fits: a mid-epoch resume is
    exact (the DataModule restores the data position, tested bit for bit); a resumed run's folders
    exist already; and the module, not the DataModule, is meant to finish batches on the device."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`")
        yield


def run_pretraining(
    cfg: PretrainConfig,
    run_dir: Path,
    resolved_config: Optional[str] = None,
    extra_callbacks: Optional[list[Any]] = None,
    environment: Optional[ClusterEnvironment] = None,
    stop: Optional[StopController] = None,
) -> Path:
    """Train (or continue training) into ``run_dir``; returns the final ``last.ckpt``.

    A fresh run starts from ``model.init`` when it is set; a run folder holding a
    ``last.ckpt`` resumes from it and ignores ``model.init``.

    Data and model are validated before anything is written; ``resolved_config`` (YAML)
    is then saved as ``run_dir/config.yaml``. ``stop`` (default: one watching no signal)
    decides every stop; a stop by a signal returns (``stop.decision`` says so), any other
    stop raises with its one line.
    """
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    datamodule = PretrainDataModule(cfg.data, cfg.augment, cfg.trainer.seed)
    datamodule.setup("fit")  # fail on a bad data path before the model is built
    module = DINOModule(cfg)
    if cfg.model.init and ckpt_path is None:
        rank_zero_info(init_module(module, cfg.model.init, cfg.model.init_which))
    elif cfg.model.init:
        rank_zero_info(f"model.init ({cfg.model.init}) not used: the run continues from its own {ckpt_path.name}")
    stop = stop or StopController()
    stop.checkpoint_every_n_steps = cfg.run.checkpoint_every_n_steps
    checkpoints = RunCheckpoints(run_dir / "checkpoints", stop, cfg.run.checkpoint_every_n_steps, cfg.run.saveckp_freq)
    bad_images = BadImagePolicy(cfg.data.on_bad_image, cfg.data.max_bad_fraction, len(datamodule.dataset),
                                run_dir, stop)
    # order matters: the monitor's epoch-end work, then the stop decision, then the save it allows
    callbacks = [bad_images] + monitor_callbacks(cfg) + list(extra_callbacks or []) + [stop, checkpoints]
    if resolved_config is not None and rank_zero_only.rank == 0:
        atomic_write_text(run_dir / "config.yaml", resolved_config)
    trainer = build_trainer(cfg, run_dir, callbacks, environment)
    if ckpt_path is not None:
        rank_zero_info(f"resuming from {ckpt_path}")
    with _expected_notices_silenced():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if stop.decision is not None and not stop.stopped_by_signal:
        raise_stop(stop.decision, checkpoints.describe_restart_point(), trainer.world_size)
    return run_dir / "checkpoints" / LAST


def raise_stop(reason: StopReason, restart_point: str, world_size: int) -> None:
    """The one line of a run that stopped itself (every rank raises the same)."""
    where = f" (noted on rank {reason.rank})" if world_size > 1 else ""
    line = f"{reason.message}{where}; {restart_point}"
    if reason.kind.startswith("nonfinite"):
        raise FloatingPointError(f"{line}; run.on_nonfinite is stop")
    if reason.kind == "collapse":
        raise RunStopped(line)
    raise UserError(f"{line}; run the same command again to continue from there")
