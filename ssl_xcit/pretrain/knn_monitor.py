"""In-training k-NN monitor: every N epochs, the DINO k-NN protocol on the current teacher."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch

from ssl_xcit.weights import IMAGENET_MEAN, IMAGENET_STD
from ssl_xcit.pretrain.config import MonitorConfig, PretrainConfig
from ssl_xcit.errors import UserError
from ssl_xcit.eval.export import Transformed, compute_features, eval_transform
from ssl_xcit.eval.knn import knn_evaluate
from ssl_xcit.image_sources import build_source


class KNNMonitor(pl.Callback):
    """Logs ``knn/top1_k{k}`` (and top5) of the teacher backbone every ``every_n_epochs``.

    The labelled train/val sources are built (and checked) at construction; features are
    computed in memory on rank 0 (other ranks wait at the next collective) with the
    evaluation transform, the teacher in eval mode, and restored to train mode after.
    """

    def __init__(self, cfg: MonitorConfig, data_cache_dir: str, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, at_start: bool = False) -> None:
        self.cfg = cfg
        self.at_start = at_start
        self.last: Optional[dict[str, Any]] = None
        self.first: Optional[dict[str, Any]] = None
        if not cfg.train_path:
            raise UserError("monitor.train_path is required when monitor.every_n_epochs > 0 or monitor.at_start")
        transform = eval_transform(cfg.resize, cfg.crop, mean, std)
        train = build_source(cfg.train_path, cfg.train_split, data_cache_dir, cfg.max_train_images)
        val = build_source(cfg.val_path or cfg.train_path, cfg.val_split, data_cache_dir, cfg.max_val_images,
                           default_splits=("val", "test"))
        self.train, self.val = Transformed(train, transform), Transformed(val, transform)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The figure of the starting teacher (e.g. ``model.init``'s), logged at step 0 of a fresh run."""
        if not self.at_start or trainer.global_step != 0 or not trainer.is_global_zero:
            return
        self.first = self.evaluate(pl_module.teacher.backbone, pl_module.device)
        metrics = self._metrics(self.first)
        for logger in trainer.loggers:  # self.log in on_train_start would only appear at the epoch's end
            logger.log_metrics(metrics, step=0)
        pl_module.print(f"step 0: teacher k-NN top-1 (k={self.cfg.k}) {self.first['results'][0]['top1']:.2f} %")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cfg.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.cfg.every_n_epochs \
                or not trainer.is_global_zero:
            return
        self.last = self.evaluate(pl_module.teacher.backbone, pl_module.device)
        row = self.last["results"][0]
        pl_module.log_dict(self._metrics(self.last), rank_zero_only=True)
        pl_module.print(f"epoch {trainer.current_epoch}: teacher k-NN top-1 (k={row['k']}) {row['top1']:.2f} %")

    @staticmethod
    def _metrics(result: dict[str, Any]) -> dict[str, float]:
        row = result["results"][0]
        metrics = {f"knn/top1_k{row['k']}": row["top1"]}
        if row["top5"] is not None:
            metrics[f"knn/top5_k{row['k']}"] = row["top5"]
        return metrics

    def evaluate(self, backbone: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        was_training = backbone.training
        backbone.eval()
        try:
            kwargs = dict(batch_size=256, num_workers=0, device=device)
            train_x, train_y = compute_features(backbone, self.train, **kwargs)
            val_x, val_y = compute_features(backbone, self.val, **kwargs)
        finally:
            backbone.train(was_training)
        return knn_evaluate(train_x, train_y, val_x, val_y, ks=(self.cfg.k,), temperature=self.cfg.temperature)


def monitor_callbacks(cfg: PretrainConfig) -> list[pl.Callback]:
    """The monitor when the config turns it on (``monitor.every_n_epochs > 0`` or ``monitor.at_start``);
    ``at_start`` left unset evaluates at step 0 of runs that start from ``model.init``."""
    at_start = cfg.monitor.at_start if cfg.monitor.at_start is not None else bool(cfg.model.init)
    if cfg.monitor.every_n_epochs <= 0 and cfg.monitor.at_start is not True:
        return []
    return [KNNMonitor(cfg.monitor, cfg.data.cache_dir, cfg.augment.mean, cfg.augment.std, at_start)]
