"""DINO self-distillation of an XCiT as a LightningModule.

Each hook does one DINO step: schedules are set in ``on_train_batch_start``, the loss in
``training_step``, last-layer freezing and per-tensor clipping in
``on_before_optimizer_step`` (gradients are unscaled there under mixed precision), and
the teacher EMA right after an optimizer step that really happened (``optimizer_step``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from ssl_xcit.pretrain import rng_state as rng
from ssl_xcit.pretrain.augment import color_on_device, normalize_crops
from ssl_xcit.backbones import MultiCropNet, build_backbone, patch_size
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.compat import grad_scaler
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.head import DINOHead
from ssl_xcit.pretrain.loss import DINOLoss, koleo_loss
from ssl_xcit.pretrain.collapse import CollapseWatch, collapse_signals
from ssl_xcit.pretrain.optim import clip_gradients_per_tensor, drop_gradients, ema_update, param_groups
from ssl_xcit.pretrain.schedules import DinoSchedules, ScheduleValues, scaled_lr


def build_student(cfg: PretrainConfig, drop_path_rate: float) -> MultiCropNet:
    """Backbone + DINO head as the config describes them."""
    m = cfg.model
    backbone = build_backbone(m.arch, drop_path_rate, **m.backbone_kwargs)
    head = DINOHead(
        backbone.num_features,
        m.out_dim,
        m.head_nlayers,
        m.head_hidden_dim,
        m.head_bottleneck_dim,
        m.use_bn_in_head,
        m.norm_last_layer,
    )
    return MultiCropNet(backbone, head)


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the loggers after the current step (its ``log_every_n_steps``
    rule counts the step in progress): values logged on other steps would be overwritten."""
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0


def check_crop_sizes(cfg: PretrainConfig, patch: int) -> None:
    for key in ("global_crops_size", "local_crops_size"):
        size = getattr(cfg.augment, key)
        if size % patch:
            raise UserError(f"augment.{key}: {size} px is not a multiple of the patch size {patch} of {cfg.model.arch}")


class DINOModule(pl.LightningModule):
    """Student (backbone + head, trained) and teacher (EMA of the student, no gradients)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": asdict(cfg)})
        self.student = build_student(cfg, cfg.model.drop_path_rate)
        check_crop_sizes(cfg, patch_size(self.student.backbone))
        self.teacher = build_student(cfg, 0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        if cfg.model.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        if cfg.model.compile:  # in place: parameter names, checkpoints and the EMA are unchanged
            self.student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        n_views = 2 + cfg.augment.local_crops_number
        self.loss_fn = DINOLoss(cfg.model.out_dim, n_views, 2, cfg.dino.student_temp, cfg.dino.center_momentum)
        self._student_params = list(self.student.parameters())
        self._teacher_params = list(self.teacher.parameters())
        self.schedules: DinoSchedules | None = None
        self._values: ScheduleValues | None = None  # the schedules at the current step
        self._skip_update = False
        self._first_nonfinite: torch.Tensor | None = None  # (step, loss) of the first non-finite loss, on the device
        self.collapse_watch: CollapseWatch | None = None
        self.stop_reason: str | None = None  # why the run stopped itself before its end

    # -- set-up -------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        return self.cfg.data.batch_size_per_device * self.trainer.world_size

    def build_schedules(self) -> DinoSchedules:
        """Schedules in optimizer steps over the whole run (max_steps, else max_epochs)."""
        per_epoch = int(self.trainer.num_training_batches)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else per_epoch * self.trainer.max_epochs
        o, d = self.cfg.optim, self.cfg.dino
        return DinoSchedules(
            total_steps=total,
            peak_lr=scaled_lr(o.lr, self.global_batch_size()),
            min_lr=o.min_lr,
            lr_warmup_steps=min(o.warmup_epochs * per_epoch, total),
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            momentum_teacher=o.momentum_teacher,
            warmup_teacher_temp=d.warmup_teacher_temp,
            teacher_temp=d.teacher_temp,
            teacher_temp_warmup_steps=min(d.warmup_teacher_temp_epochs * per_epoch, total),
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self.student), lr=0.0, betas=self.cfg.optim.betas)

    def on_train_start(self) -> None:
        self.schedules = self.build_schedules()
        s = self.schedules
        r = self.cfg.run
        self.collapse_watch = CollapseWatch(self.cfg.model.out_dim, max(s.lr_warmup_steps, s.teacher_temp_warmup_steps),
                                            r.collapse_patience, r.collapse_margin)
        self.print(
            f"global batch {self.global_batch_size()} on {self.trainer.world_size} process(es): "
            f"peak lr {s.peak_lr:.3g}, {s.total_steps} optimizer steps, {s.lr_warmup_steps} warm-up steps"
        )

    # -- one step -----------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The crops' last steps, on the training device: uint8 → normalised floats (and for
        augment.device=train, the colour parameters applied first); model.channels_last: the
        crops in that layout."""
        if "params" in batch:
            batch = {"crops": color_on_device(batch, self.cfg.augment), "bad": batch["bad"]}
        elif batch["crops"][0].dtype == torch.uint8:
            batch = {**batch, "crops": normalize_crops(batch["crops"], self.cfg.augment)}
        if self.cfg.model.channels_last:
            batch = {**batch, "crops": [c.contiguous(memory_format=torch.channels_last) for c in batch["crops"]]}
        if self._trainer is not None:  # *-true precisions cast float inputs before this hook, when the crops were uint8
            batch = self.trainer.precision_plugin.convert_input(batch)
        return batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        assert self.schedules is not None
        self._values = values = self.schedules.at(self.global_step)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = values.lr
            if group["apply_weight_decay"]:
                group["weight_decay"] = values.weight_decay

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """``batch["crops"]``: 2 global then the local crops, each (B, 3, S, S), normalised."""
        values = self._values
        assert values is not None
        crops = batch["crops"]
        teacher_logits = self.teacher(crops[:2])  # (2B, K)
        student_embeddings = self.student.embed(crops)  # (V B, D)
        student_logits = self.student.head(student_embeddings)  # (V B, K)
        dino = self.loss_fn(student_logits, teacher_logits, values.teacher_temp)
        koleo = self._koleo(student_embeddings[: 2 * len(crops[0])])
        loss = dino if koleo is None else dino + self.cfg.dino.koleo_weight * koleo
        if self.cfg.run.on_nonfinite == "skip":
            # skipping must know before the update: one host sync per step, the price of this choice
            self._skip_update = not math.isfinite(loss.item())
            if self._skip_update:
                self.print(f"non-finite loss at step {self.global_step}: update skipped")
                return None
        else:
            self._note_nonfinite(loss.detach())
        if logs_this_step(self.trainer):
            self.raise_if_nonfinite_seen()
            self.log("train/loss", loss, prog_bar=True)
            if koleo is not None:
                self.log_dict({"train/dino_loss": dino, "train/koleo": koleo})
            self._log_schedules_and_signals(values, teacher_logits)
        return loss

    def _koleo(self, global_embeddings: torch.Tensor) -> torch.Tensor | None:
        """KoLeo of the student's class tokens, one term per global view (2B, D), or None when off."""
        if self.cfg.dino.koleo_weight <= 0:
            return None
        return sum(koleo_loss(view) for view in global_embeddings.chunk(2))

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember the first non-finite loss on the device, without waiting for it (no host
        sync in the step): :meth:`raise_if_nonfinite_seen` reads it at logging steps and before
        every checkpoint, so a run stops before saving any state a non-finite loss touched."""
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.full((2,), math.nan, device=loss.device)  # (step, loss)
        first = self._first_nonfinite
        new = ~torch.isfinite(loss) & torch.isnan(first[0])
        here = torch.stack([torch.full_like(loss, self.global_step, dtype=first.dtype), loss.to(first.dtype)])
        self._first_nonfinite = torch.where(new, here, first)

    def raise_if_nonfinite_seen(self) -> None:
        """Stop (``run.on_nonfinite: stop``) naming the step of the first non-finite loss."""
        if self._first_nonfinite is None:
            return
        step, value = self._first_nonfinite.tolist()
        if not math.isnan(step):
            raise FloatingPointError(f"non-finite loss {value} at step {int(step)}; stopping")

    def _log_schedules_and_signals(self, values: Any, teacher_logits: torch.Tensor) -> None:
        signals = collapse_signals(teacher_logits.detach(), self.loss_fn.center, values.teacher_temp)
        self.log_dict({f"collapse/{k}": v for k, v in signals.items()})
        self._sound_collapse_alarm(signals)
        self.log_dict(
            {
                "schedule/lr": values.lr,
                "schedule/weight_decay": values.weight_decay,
                "schedule/momentum_teacher": values.momentum_teacher,
                "schedule/teacher_temp": values.teacher_temp,
            }
        )

    def _sound_collapse_alarm(self, signals: dict[str, float]) -> None:
        """Warn (``run.on_collapse: warn``) or also stop cleanly (``stop``: every rank agrees,
        the step's checkpoint is written) when a collapse signal stays near log K."""
        alarm = self.collapse_watch.update(self.global_step, signals) if self.collapse_watch else None
        if alarm:
            rank_zero_warn(alarm)
        if self.cfg.run.on_collapse == "stop" and self.trainer.strategy.reduce_boolean_decision(bool(alarm), all=False):
            self.stop_reason = alarm or "collapse signalled on another rank"
            self.trainer.should_stop = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.current_epoch < self.cfg.optim.freeze_last_layer:
            drop_gradients(self.student.head.last_layer)
        if self.cfg.optim.clip_grad > 0:
            clip_gradients_per_tensor(self._student_params, self.cfg.optim.clip_grad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        scaler = grad_scaler(self.trainer)
        scale_before = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        stepped = not self._skip_update and (scaler is None or scaler.get_scale() >= scale_before)
        if stepped:
            assert self._values is not None  # set for this step in on_train_batch_start
            ema_update(self._teacher_params, self._student_params, self._values.momentum_teacher)

    # -- checkpoint extras --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite_seen()  # never save a state a non-finite loss has touched
        checkpoint["rng_states"] = rng.capture_all_ranks()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            rng.restore_own_rank(checkpoint["rng_states"], self.global_rank)
