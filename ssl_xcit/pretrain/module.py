"""DINO self-distillation of an XCiT as a LightningModule.

Each hook does one DINO step: schedules are set in ``on_train_batch_start``, the loss in
``training_step``, last-layer freezing and per-tensor clipping in
``on_before_optimizer_step`` (gradients are unscaled there under mixed precision), and
the teacher EMA and the center's update right after the optimizer step (``optimizer_step``).

A step whose gradients are not all finite is skipped on every rank, decided on the device:
DDP's gradient all-reduce hands a rank's non-finite gradients to every rank (a non-finite
loss is made to give NaN gradients), so the 0-d flag "some gradient is not finite" is the
same everywhere without a collective of its own, and the optimizer (fused AdamW's
``found_inf``), the EMA and the center all take it on the device. No step reads anything
back from the device except at the stop controller's decision points
(:mod:`ssl_xcit.pretrain.stop`) and the logging steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from ssl_xcit.pretrain import rng_state as rng
from ssl_xcit.pretrain.augment import color_on_device, normalize_crops
from ssl_xcit.backbones import MultiCropNet, build_backbone, compile_blocks, patch_size
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.compat import clear_optimizer_skip, skip_optimizer_step_if
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.head import DINOHead
from ssl_xcit.pretrain.loss import DINOLoss, koleo_loss
from ssl_xcit.pretrain.collapse import CollapseWatch, collapse_signals
from ssl_xcit.pretrain.optim import (BufferRollback, clip_gradients_per_tensor, drop_gradients, ema_update,
                                    gradient_norms, param_groups)
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
        if cfg.model.compile:  # each block in place: parameter names, checkpoints and the EMA are unchanged
            compile_blocks(self.student.backbone)
            compile_blocks(self.teacher.backbone)
        n_views = 2 + cfg.augment.local_crops_number
        self.loss_fn = DINOLoss(cfg.model.out_dim, n_views, 2, cfg.dino.student_temp, cfg.dino.center_momentum)
        self._student_params = list(self.student.parameters())
        self._teacher_params = list(self.teacher.parameters())
        self.schedules: DinoSchedules | None = None
        self._values: ScheduleValues | None = None  # the schedules at the current step
        self._batch_center: Optional[torch.Tensor] = None  # (1, K) this step's teacher mean, all-reduced
        self._skip: Optional[torch.Tensor] = None  # 0-d bool: this step's gradients are not all finite
        self._nonfinite = NonFiniteRecord()
        self._buffer_rollback: Optional[BufferRollback] = None  # built on the training device
        self.collapse_watch: CollapseWatch | None = None
        self._collapse_alarm: Optional[tuple[str, int]] = None  # (alarm, step) under run.on_collapse stop

    # -- set-up -------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        return self.cfg.data.batch_size_per_device * self.trainer.world_size

    def build_schedules(self) -> DinoSchedules:
        """Schedules in optimizer steps over the steps the run will take: the fewer of max_steps
        and max_epochs' steps, where both are set."""
        per_epoch = int(self.trainer.num_training_batches)
        total = run_length(per_epoch, self.trainer.max_steps, self.trainer.max_epochs)
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
        """AdamW, fused (one kernel per step; it also skips a step on the device). Not under fp16's
        GradScaler: Lightning leaves the unscaling to a fused optimizer, after our clipping."""
        fused = self.trainer.precision != "16-mixed"
        return torch.optim.AdamW(param_groups(self.student, self.cfg.optim.decay_rule), lr=0.0,
                                 betas=self.cfg.optim.betas, fused=fused)

    def setup(self, stage: str) -> None:
        """Each rank its own random stream for drop path (seed + rank), after the model was built
        alike on every rank; a resumed run then restores every rank's saved stream."""
        rng.seed_all(self.cfg.trainer.seed + self.trainer.global_rank)

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
        if self._buffer_rollback is None:
            self._buffer_rollback = BufferRollback(list(self.student.buffers()) + list(self.teacher.buffers()))
        self._buffer_rollback.snapshot()
        assert self.schedules is not None
        self._values = values = self.schedules.at(self.global_step)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = values.lr
            if group["apply_weight_decay"]:
                group["weight_decay"] = values.weight_decay

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """``batch["crops"]``: 2 global then the local crops, each (B, 3, S, S), normalised."""
        values = self._values
        assert values is not None
        crops = batch["crops"]
        teacher_logits = self.teacher(crops[:2])  # (2B, K)
        student_embeddings = self.student.embed(crops)  # (V B, D)
        student_logits = self.student.head(student_embeddings)  # (V B, K)
        dino = self.loss_fn(student_logits, teacher_logits, values.teacher_temp)
        self._batch_center = self.loss_fn.batch_center(teacher_logits)  # the one collective DINO's maths needs
        koleo = self._koleo(student_embeddings[: 2 * len(crops[0])])
        loss = dino if koleo is None else dino + self.cfg.dino.koleo_weight * koleo
        self._nonfinite.note_loss(loss.detach(), self.global_step)
        if logs_this_step(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
            if koleo is not None:
                self.log_dict({"train/dino_loss": dino, "train/koleo": koleo})
            self._log_schedules_and_signals(values, teacher_logits)
        # a non-finite loss gets NaN gradients for certain, which DDP then hands to every rank
        return loss * torch.where(torch.isfinite(loss), 1.0, math.nan)

    def _koleo(self, global_embeddings: torch.Tensor) -> torch.Tensor | None:
        """KoLeo of the student's class tokens, one term per global view (2B, D), or None when off."""
        if self.cfg.dino.koleo_weight <= 0:
            return None
        return sum(koleo_loss(view) for view in global_embeddings.chunk(2))

    def pending_stop(self) -> Optional[tuple[str, str, int]]:
        """What this rank has seen that stops the run, for the stop controller's decision points:
        (kind, one line, step), or None. Reads the device (a host sync at the decision cadence)."""
        self._nonfinite.report_skips(self)
        if self.cfg.run.on_nonfinite == "stop":
            found = self._nonfinite.first()
            if found is not None:
                return found
        if self._collapse_alarm is not None:
            alarm, step = self._collapse_alarm
            return "collapse", f"{alarm}; run.on_collapse is stop", step
        return None

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
        """Warn (``run.on_collapse: warn``) or also stop cleanly (``stop``: noted for the stop
        controller, which stops every rank and writes the checkpoint) when a collapse signal
        stays near log K."""
        alarm = self.collapse_watch.update(self.global_step, signals) if self.collapse_watch else None
        if alarm:
            rank_zero_warn(alarm)
            if self.cfg.run.on_collapse == "stop" and self._collapse_alarm is None:
                self._collapse_alarm = (alarm, self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.current_epoch < self.cfg.optim.freeze_last_layer:
            drop_gradients(self.student.head.last_layer)
        norms = gradient_norms(self._student_params)
        assert norms is not None, "the student always has gradients after backward"
        self._skip = ~norms.isfinite().all()  # the same on every rank: DDP has all-reduced the gradients
        if logs_this_step(self.trainer):
            self.log_dict({"train/grad_norm": norms.square().sum().sqrt(), "train/grad_norm_max": norms.max()})
        if self.cfg.optim.clip_grad > 0:
            clip_gradients_per_tensor(self._student_params, self.cfg.optim.clip_grad, norms)
        skip_optimizer_step_if(optimizer, self._skip)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step (skipped on the device when ``_skip``), then the teacher EMA and the center,
        which a skipped step leaves as they are."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        clear_optimizer_skip(optimizer)
        assert self._values is not None and self._skip is not None and self._batch_center is not None
        ema_update(self._teacher_params, self._student_params, self._values.momentum_teacher, self._skip)
        self.loss_fn.update_center(self._batch_center, self._skip)
        assert self._buffer_rollback is not None
        self._buffer_rollback.restore_if(self._skip)
        self._nonfinite.note_skip(self._skip, self.global_step)

    # -- checkpoint extras --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng.capture_all_ranks()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            rng.restore_own_rank(checkpoint["rng_states"], self.global_rank)


def run_length(steps_per_epoch: int, max_steps: int, max_epochs: Optional[int]) -> int:
    """Optimizer steps the run will take: the fewer of ``max_steps`` and ``max_epochs`` epochs,
    where each is set (``max_steps`` -1 and ``max_epochs`` None or -1 mean unset)."""
    limits = [max_steps] if max_steps > 0 else []
    if max_epochs is not None and max_epochs > 0:
        limits.append(steps_per_epoch * max_epochs)
    if not limits:
        raise UserError("trainer: set max_epochs or max_steps (the schedules need the run's length)")
    return min(limits)


class NonFiniteRecord:
    """Where non-finite values appeared, kept on the device (no host sync in the step) and read
    at the stop controller's decision points: this rank's first non-finite loss (step, value),
    the first skipped step (the same on every rank) and how many steps were skipped."""

    def __init__(self) -> None:
        self.loss: Optional[torch.Tensor] = None  # (step, loss), NaN while none
        self.skipped: Optional[torch.Tensor] = None  # (first skipped step or NaN, count)
        self._reported = 0

    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        if self.loss is None:
            self.loss = torch.full((2,), math.nan, device=loss.device)
        new = ~torch.isfinite(loss) & torch.isnan(self.loss[0])
        here = torch.stack([torch.full_like(loss, step, dtype=self.loss.dtype), loss.to(self.loss.dtype)])
        self.loss = torch.where(new, here, self.loss)

    def note_skip(self, skip: torch.Tensor, step: int) -> None:
        if self.skipped is None:
            self.skipped = torch.tensor([math.nan, 0.0], device=skip.device)
        first = torch.where(skip & torch.isnan(self.skipped[0]), float(step), self.skipped[0])
        self.skipped = torch.stack([first, self.skipped[1] + skip.float()])

    def first(self) -> Optional[tuple[str, str, int]]:
        """The first non-finite value this rank saw, as a stop reason (kind, one line, step)."""
        if self.loss is not None:
            step, value = self.loss.tolist()
            if not math.isnan(step):
                return "nonfinite_loss", f"non-finite loss {value} at step {int(step)}", int(step)
        if self.skipped is not None:
            step = self.skipped[0].item()
            if not math.isnan(step):
                return "nonfinite_gradients", f"non-finite gradients at step {int(step)}", int(step)
        return None

    def report_skips(self, module: pl.LightningModule) -> None:
        """Say (rank 0) how many steps were skipped since the last report, under run.on_nonfinite skip."""
        if module.cfg.run.on_nonfinite != "skip" or self.skipped is None:
            return
        first, count = self.skipped.tolist()
        if int(count) > self._reported:
            self._reported = int(count)
            module.print(f"{int(count)} step(s) with non-finite values skipped so far (the first at step {int(first)}): "
                         "optimizer, teacher and center left unchanged by each")
