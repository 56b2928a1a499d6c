"""In-training k-NN monitor: every N epochs, the DINO k-NN protocol on the current teacher,
with the figure of randomly initialised features as the floor every curve must beat."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from ssl_xcit.errors import UserError
from ssl_xcit.eval.export import Transformed, eval_transform
from ssl_xcit.eval.knn import knn_evaluate
from ssl_xcit.eval.linear_grid import HOLDOUT_SEED, stratified_split
from ssl_xcit.eval.sharded_export import compute_features_sharded
from ssl_xcit.image_sources import build_source, describe
from ssl_xcit.pretrain.collapse import rankme
from ssl_xcit.pretrain.config import MonitorConfig, PretrainConfig
from ssl_xcit.pretrain.preemption import ignore_stop_signals
from ssl_xcit.weights import random_backbone

BATCH_SIZE = 256


def _random_subset(rows: np.ndarray, limit: Optional[int], seed: int = 0) -> np.ndarray:
    """A fixed random ``limit`` of ``rows``, in their order (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(rows):
        return rows
    return rows[np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])]


def monitor_sets(m: MonitorConfig, cache_dir: str) -> tuple[Dataset, Dataset]:
    """(bank, queries) labelled image sources of the monitor.

    By default the queries are ``m.holdout_fraction`` of each class of ``train_split``
    (:func:`~ssl_xcit.eval.linear_grid.stratified_split`, seed ``HOLDOUT_SEED``) and the bank
    is the rest; ``val_path`` or ``val_split`` names the queries' images instead. Either
    set is then cut to ``max_train_images`` / ``max_val_images``.
    """
    if not m.train_path:
        raise UserError("monitor.train_path is required when monitor.every_n_epochs > 0 or monitor.at_start")
    if m.val_path or m.val_split:
        bank = build_source(m.train_path, m.train_split, cache_dir, m.max_train_images,
                            option="monitor.train_path")
        queries = build_source(m.val_path or m.train_path, m.val_split, cache_dir, m.max_val_images,
                               default_splits=("val", "test"), option="monitor.val_path")
        return bank, queries
    if not 0.0 < m.holdout_fraction < 1.0:
        raise UserError(f"monitor.holdout_fraction must be in (0, 1), got {m.holdout_fraction}")
    train = build_source(m.train_path, m.train_split, cache_dir, option="monitor.train_path")
    labels = np.asarray(describe(train)[1])
    bank_rows, query_rows = stratified_split(labels, m.holdout_fraction, HOLDOUT_SEED)
    if len(query_rows) == 0:
        raise UserError(f"monitor.holdout_fraction: {m.holdout_fraction} of each class of the {len(labels)} images "
                        f"of {m.train_path} holds out no image; raise it")
    # Python ints: a source may index with them as seeds (numpy's int64 is not one for torch.Generator)
    return (Subset(train, _random_subset(bank_rows, m.max_train_images).tolist()),
            Subset(train, _random_subset(query_rows, m.max_val_images).tolist()))


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class KNNMonitor(pl.Callback):
    """Logs ``knn/top1_k{k}`` (and top5) of the teacher backbone every ``every_n_epochs``, and
    ``knn/rankme``, the effective rank of its features on the bank (dimensional collapse
    shows there first).

    At step 0 of a fresh run it logs ``knn/random_top1_k{k}``, the same protocol on a
    randomly initialised backbone of the run's architecture (seeded by ``trainer.seed``),
    and, with ``at_start``, the starting teacher's figure (e.g. ``model.init``'s). At the
    end it prints the last figure beside that floor.

    The bank and the images to classify (:func:`monitor_sets`) are built and checked at
    construction. A pass is shared by the processes of a distributed run: each computes the
    features of its contiguous share of both sets with the evaluation transform, in float32,
    the teacher in eval mode (restored to train mode after); one gather per set brings them
    to rank 0, which runs the k-NN and logs. Every rank therefore runs every hook alike.
    Each rank evaluates its own teacher: without SyncBatchNorm (CPU) the ranks' BatchNorm
    statistics, and so their features, differ slightly. A run resumed from the checkpoint
    of an epoch's last batch evaluates that epoch again (the monitor runs after that
    checkpoint: a stop during it must not lose the figure).
    """

    def __init__(self, cfg: PretrainConfig, at_start: bool = False) -> None:
        self.cfg, m = cfg, cfg.monitor
        self.at_start = at_start
        self.last: Optional[dict[str, Any]] = None
        self.first: Optional[dict[str, Any]] = None
        self.floor: Optional[float] = None
        transform = eval_transform(m.resize, m.crop, cfg.augment.mean, cfg.augment.std)
        bank, queries = monitor_sets(m, cfg.data.cache_dir)
        self.bank, self.queries = Transformed(bank, transform), Transformed(queries, transform)

    @property
    def key(self) -> str:
        return f"knn/top1_k{self.cfg.monitor.k}"

    # -- hooks (every rank runs each alike: a pass holds collectives) -------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._log_floor(trainer, pl_module)
            if self.at_start:
                self.first = self._evaluate_and_log(trainer, pl_module, "step 0")
        elif self._resumed_after_monitored_epoch(trainer):
            self._evaluate_and_log(trainer, pl_module, f"epoch {trainer.current_epoch - 1} (again, after resuming)")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Not when the run is stopping (a signal's grace period is short, and the epoch may be
        cut short): the resumed run evaluates this epoch at its start instead."""
        if self._monitored(trainer.current_epoch) and not trainer.should_stop:
            self.last = self._evaluate_and_log(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last is not None and self.floor is not None:  # rank 0's figures
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
        result = self.evaluate(random.to(pl_module.device), pl_module.device)
        if result is None:
            return
        self.floor = result["results"][0]["top1"]
        for logger in trainer.loggers:  # self.log in on_train_start would only appear at the epoch's end
            logger.log_metrics({f"knn/random_top1_k{self.cfg.monitor.k}": self.floor}, step=0)
        pl_module.print(f"random-init features: k-NN top-1 (k={self.cfg.monitor.k}) {self.floor:.2f} % (the floor)")

    def _evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          when: str) -> Optional[dict[str, Any]]:
        result = self.evaluate(pl_module.teacher.backbone, pl_module.device)
        if result is None:
            return None
        row = result["results"][0]
        metrics = {self.key: row["top1"], "knn/rankme": result["rankme"]}
        if row["top5"] is not None:
            metrics[f"knn/top5_k{row['k']}"] = row["top5"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        pl_module.print(f"{when}: teacher k-NN top-1 (k={row['k']}) {row['top1']:.2f} %, "
                        f"RankMe {result['rankme']:.1f} of {result['dim']}")
        return result

    def evaluate(self, backbone: torch.nn.Module, device: torch.device) -> Optional[dict[str, Any]]:
        """The k-NN report of ``backbone`` (with ``rankme`` and ``dim``) on rank 0, None on the
        others; every rank must call it (it gathers the ranks' features)."""
        was_training = backbone.training
        backbone.eval()
        try:
            kwargs = dict(batch_size=BATCH_SIZE, num_workers=self.cfg.monitor.num_workers, device=device,
                          worker_init_fn=ignore_stop_signals)  # a cluster's stop signal is the trainer's to act on
            bank_x, bank_y = compute_features_sharded(backbone, self.bank, **kwargs)
            query_x, query_y = compute_features_sharded(backbone, self.queries, **kwargs)
        finally:
            backbone.train(was_training)
        if not _is_rank_zero():
            return None
        m = self.cfg.monitor
        # torch's search: no faiss needed, and no second GPU memory pool beside training's
        report = knn_evaluate(bank_x, bank_y, query_x, query_y, ks=(m.k,), temperature=m.temperature, backend="torch")
        report["rankme"], report["dim"] = rankme(torch.from_numpy(bank_x)), bank_x.shape[1]
        return report


def monitor_callbacks(cfg: PretrainConfig) -> list[pl.Callback]:
    """The monitor when the config turns it on (``monitor.every_n_epochs > 0`` or ``monitor.at_start``);
    ``at_start`` left unset evaluates at step 0 of runs that start from ``model.init``."""
    at_start = cfg.monitor.at_start if cfg.monitor.at_start is not None else bool(cfg.model.init)
    if cfg.monitor.every_n_epochs <= 0 and cfg.monitor.at_start is not True:
        return []
    return [KNNMonitor(cfg, at_start)]
