"""In-training k-NN monitor: every N epochs, the DINO k-NN protocol on the current teacher,
with the figure of randomly initialised features as the floor every curve must beat."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch

from ssl_xcit.errors import UserError
from ssl_xcit.eval.export import Transformed, compute_features, eval_transform
from ssl_xcit.eval.knn import knn_evaluate
from ssl_xcit.image_sources import build_source
from ssl_xcit.pretrain.collapse import rankme
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.weights import random_backbone


class KNNMonitor(pl.Callback):
    """Logs ``knn/top1_k{k}`` (and top5) of the teacher backbone every ``every_n_epochs``, and
    ``knn/rankme``, the effective rank of its features on the bank (dimensional collapse
    shows there first).

    At step 0 of a fresh run it logs ``knn/random_top1_k{k}``, the same protocol on a
    randomly initialised backbone of the run's architecture (seeded by ``trainer.seed``),
    and, with ``at_start``, the starting teacher's figure (e.g. ``model.init``'s). At the
    end it prints the last figure beside that floor.

    The labelled train/val sources are built (and checked) at construction; features are
    computed in memory on rank 0 (other ranks wait at the next collective) with the
    evaluation transform, the teacher in eval mode, and restored to train mode after.
    A run resumed from the checkpoint of an epoch's last batch evaluates that epoch again
    (the monitor runs after that checkpoint: a stop during it must not lose the figure).
    """

    def __init__(self, cfg: PretrainConfig, at_start: bool = False) -> None:
        self.cfg, m = cfg, cfg.monitor
        self.at_start = at_start
        self.last: Optional[dict[str, Any]] = None
        self.first: Optional[dict[str, Any]] = None
        self.floor: Optional[float] = None
        if not m.train_path:
            raise UserError("monitor.train_path is required when monitor.every_n_epochs > 0 or monitor.at_start")
        transform = eval_transform(m.resize, m.crop, cfg.augment.mean, cfg.augment.std)
        train = build_source(m.train_path, m.train_split, cfg.data.cache_dir, m.max_train_images,
                             option="monitor.train_path")
        val = build_source(m.val_path or m.train_path, m.val_split, cfg.data.cache_dir, m.max_val_images,
                           default_splits=("val", "test"), option="monitor.val_path")
        self.train, self.val = Transformed(train, transform), Transformed(val, transform)

    @property
    def key(self) -> str:
        return f"knn/top1_k{self.cfg.monitor.k}"

    # -- hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.global_step == 0:
            self._log_floor(trainer, pl_module)
            if self.at_start:
                self.first = self._evaluate_and_log(trainer, pl_module, "step 0")
        elif self._resumed_after_monitored_epoch(trainer):
            self._evaluate_and_log(trainer, pl_module, f"epoch {trainer.current_epoch - 1} (again, after resuming)")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._monitored(trainer.current_epoch):
            self.last = self._evaluate_and_log(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.last is not None and self.floor is not None:
            top1 = self.last["results"][0]["top1"]
            pl_module.print(f"teacher k-NN top-1 (k={self.cfg.monitor.k}) {top1:.2f} % against {self.floor:.2f} % "
                            f"for random-init features: {top1 - self.floor:+.2f} points")

    def state_dict(self) -> dict[str, Any]:
        return {"floor": self.floor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.floor = state.get("floor")

    # -- evaluation ---------------------------------------------------------------------
    def _monitored(self, epoch: int) -> bool:
        every = self.cfg.monitor.every_n_epochs
        return every > 0 and (epoch + 1) % every == 0

    def _resumed_after_monitored_epoch(self, trainer: pl.Trainer) -> bool:
        at_epoch_start = trainer.global_step % max(1, int(trainer.num_training_batches)) == 0
        return at_epoch_start and trainer.current_epoch > 0 and self._monitored(trainer.current_epoch - 1)

    def _log_floor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = self.cfg.model
        random = random_backbone(m.arch, self.cfg.trainer.seed, **m.backbone_kwargs).model
        self.floor = self.evaluate(random.to(pl_module.device), pl_module.device)["results"][0]["top1"]
        for logger in trainer.loggers:  # self.log in on_train_start would only appear at the epoch's end
            logger.log_metrics({f"knn/random_top1_k{self.cfg.monitor.k}": self.floor}, step=0)
        pl_module.print(f"random-init features: k-NN top-1 (k={self.cfg.monitor.k}) {self.floor:.2f} % (the floor)")

    def _evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> dict[str, Any]:
        result = self.evaluate(pl_module.teacher.backbone, pl_module.device)
        row = result["results"][0]
        metrics = {self.key: row["top1"], "knn/rankme": result["rankme"]}
        if row["top5"] is not None:
            metrics[f"knn/top5_k{row['k']}"] = row["top5"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        pl_module.print(f"{when}: teacher k-NN top-1 (k={row['k']}) {row['top1']:.2f} %, "
                        f"RankMe {result['rankme']:.1f} of {result['dim']}")
        return result

    def evaluate(self, backbone: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        was_training = backbone.training
        backbone.eval()
        try:
            kwargs = dict(batch_size=256, num_workers=0, device=device)
            train_x, train_y = compute_features(backbone, self.train, **kwargs)
            val_x, val_y = compute_features(backbone, self.val, **kwargs)
        finally:
            backbone.train(was_training)
        m = self.cfg.monitor
        report = knn_evaluate(train_x, train_y, val_x, val_y, ks=(m.k,), temperature=m.temperature)
        report["rankme"], report["dim"] = rankme(torch.from_numpy(train_x)), train_x.shape[1]
        return report


def monitor_callbacks(cfg: PretrainConfig) -> list[pl.Callback]:
    """The monitor when the config turns it on (``monitor.every_n_epochs > 0`` or ``monitor.at_start``);
    ``at_start`` left unset evaluates at step 0 of runs that start from ``model.init``."""
    at_start = cfg.monitor.at_start if cfg.monitor.at_start is not None else bool(cfg.model.init)
    if cfg.monitor.every_n_epochs <= 0 and cfg.monitor.at_start is not True:
        return []
    return [KNNMonitor(cfg, at_start)]
