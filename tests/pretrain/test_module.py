"""Invariants of the LightningModule, checked through short real Trainer runs."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import tiny_pretrain_args
from ssl_xcit.pretrain.command import parse_pretrain_args
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.module import DINOModule
from ssl_xcit.pretrain.run import run_pretraining


def tiny_config(run_dir: Path, **overrides: str):
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="32", data__synthetic_resolution="40",
                              **overrides)
    return parse_pretrain_args(args)[0]


def test_teacher_starts_equal_to_student_and_has_no_trainable_parameters(tmp_path):
    module = DINOModule(tiny_config(tmp_path))
    student, teacher = module.student.state_dict(), module.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_drop_path_on_the_student_only(tmp_path):
    module = DINOModule(tiny_config(tmp_path, model__drop_path_rate="0.2"))
    kinds = lambda net: {type(m).__name__ for m in net.backbone.modules()}  # noqa: E731
    assert "DropPath" in kinds(module.student) and "DropPath" not in kinds(module.teacher)


class Recorder(pl.Callback):
    """Records, per optimizer step, whether the last layer moved and whether the teacher got gradients."""

    def __init__(self):
        self.last_layer_moved, self.teacher_grads, self.student_moved = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._last = module.student.head.last_layer.parametrizations.weight.original1.detach().clone()
        self._mlp = module.student.head.mlp[0].weight.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = module.student.head.last_layer.parametrizations.weight.original1
        self.last_layer_moved.append((trainer.current_epoch, not torch.equal(now, self._last)))
        self.student_moved.append(not torch.equal(module.student.head.mlp[0].weight, self._mlp))
        self.teacher_grads.append(any(p.grad is not None for p in module.teacher.parameters()))


def test_last_layer_frozen_then_free_and_teacher_never_gets_gradients(tmp_path):
    recorder = Recorder()
    cfg = tiny_config(tmp_path, optim__freeze_last_layer="1", optim__lr="0.5")
    run_pretraining(cfg, tmp_path, extra_callbacks=[recorder])
    by_epoch = {e: [moved for ep, moved in recorder.last_layer_moved if ep == e] for e in (0, 1)}
    assert by_epoch[0] and not any(by_epoch[0])
    assert all(by_epoch[1])
    assert not recorder.student_moved[0] and all(recorder.student_moved[1:])  # lr warms up from 0 at step 0
    assert not any(recorder.teacher_grads)


class CheckEMA(pl.Callback):
    """Checks teacher_after == m * teacher_before + (1 - m) * student_after for each step."""

    def __init__(self):
        self.errors = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._teacher = [p.detach().clone() for p in module.teacher.parameters()]
        self._m = module.schedules.at(trainer.global_step).momentum_teacher

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for t0, t1, s in zip(self._teacher, module.teacher.parameters(), module.student.parameters()):
            self.errors.append((t1 - (self._m * t0 + (1 - self._m) * s)).abs().max().item())


def test_teacher_follows_ema_of_student_with_scheduled_momentum(tmp_path):
    check = CheckEMA()
    run_pretraining(tiny_config(tmp_path, trainer__max_epochs="1", optim__lr="0.5"), tmp_path, extra_callbacks=[check])
    assert check.errors and max(check.errors) < 1e-6


def test_non_finite_loss_stops_with_step_number(tmp_path, monkeypatch):
    monkeypatch.setattr("ssl_xcit.pretrain.loss.dino_cross_entropy", nan_on_call(1))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
        run_pretraining(tiny_config(tmp_path), tmp_path)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def nan_on_call(bad_call: int):
    """The DINO cross-entropy, made NaN on its ``bad_call``-th call (1-based)."""
    real = __import__("ssl_xcit.pretrain.loss", fromlist=["x"]).dino_cross_entropy
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == bad_call else value

    return loss


class StateAroundSteps(pl.Callback):
    """Every tensor of the run's state (student, teacher, center, optimizer) before and after each step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def snapshot(trainer, module):
        state = {f"module.{k}": v.detach().clone() for k, v in module.state_dict().items()}
        optimizer = trainer.optimizers[0]
        for i, p in enumerate(module.student.parameters()):
            state.update({f"optimizer.{i}.{k}": v.clone() for k, v in optimizer.state.get(p, {}).items()})
        return state

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self.snapshot(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self.snapshot(trainer, module)


def test_a_skipped_step_changes_nothing_and_later_steps_train(tmp_path, monkeypatch):
    """run.on_nonfinite skip: the step with the non-finite loss leaves weights, teacher, center and
    AdamW's moments and step counts exactly as they were; the steps after it train as usual."""
    monkeypatch.setattr("ssl_xcit.pretrain.loss.dino_cross_entropy", nan_on_call(2))
    states = StateAroundSteps()
    cfg = tiny_config(tmp_path, run__on_nonfinite="skip", trainer__max_epochs="1", optim__lr="0.5")
    last = run_pretraining(cfg, tmp_path, extra_callbacks=[states])
    skipped_before, skipped_after = states.before[1], states.after[1]
    assert skipped_before.keys() == skipped_after.keys() and any(k.startswith("optimizer.") for k in skipped_after)
    assert all(torch.equal(skipped_before[k], skipped_after[k]) for k in skipped_before)
    for step in (0, 2, 3):
        changed = [k for k in states.before[step] if not torch.equal(states.before[step][k], states.after[step][k])]
        assert "module.loss_fn.center" in changed and any(k.startswith("module.teacher.") for k in changed)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"augment__global_crops_size": "36"}, "augment.global_crops_size: 36 px is not a multiple of the patch size 8"),
        ({"model__arch": "xcit_huge_99"}, "model.arch: unknown XCiT architecture 'xcit_huge_99'"),
        ({"model__backbone_kwargs": "{depthh: 2}"}, "model.backbone_kwargs"),
    ],
)
def test_model_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        DINOModule(tiny_config(tmp_path, **overrides))


def test_non_finite_loss_between_logging_steps_stops_before_any_checkpoint_holds_it(tmp_path, monkeypatch):
    """The stop controller reads a device-side record (no host sync in the step) at its decision
    points, one of them before every save: a NaN at step 1 stops the run naming step 1, and
    last.ckpt keeps the state of the steps before it."""
    monkeypatch.setattr("ssl_xcit.pretrain.loss.dino_cross_entropy", nan_on_call(2))
    cfg = tiny_config(tmp_path, trainer__log_every_n_steps="50", run__checkpoint_every_n_steps="1")
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 1"):
        run_pretraining(cfg, tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("augment_device", ["workers", "train"])
def test_true_precision_gets_crops_in_the_model_dtype(tmp_path, augment_device):
    """The workers ship uint8 crops, normalised on the device after Lightning's input cast: a
    bf16-true model must still receive bf16 crops (float32 crops would fail its first conv)."""
    seen = []

    class Dtypes(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append({c.dtype for c in batch["crops"]})

    cfg = tiny_config(tmp_path, trainer__precision="bf16-true", augment__device=augment_device)
    run_pretraining(cfg, tmp_path, extra_callbacks=[Dtypes()])
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)


def test_logits_reach_the_loss_in_float32_under_bf16_mixed(tmp_path, monkeypatch):
    """The prototype logits (divided by a teacher temperature of 0.04 in the loss) must not be
    rounded to bf16 on the way: the head's last layer runs with autocast off."""
    import ssl_xcit.pretrain.loss as loss_module

    real, seen = loss_module.dino_cross_entropy, []

    def recording(student_logits, teacher_logits, *args, **kwargs):
        seen.append((student_logits.dtype, teacher_logits.dtype, torch.is_autocast_enabled("cpu")))
        return real(student_logits, teacher_logits, *args, **kwargs)

    monkeypatch.setattr(loss_module, "dino_cross_entropy", recording)
    run_pretraining(tiny_config(tmp_path, trainer__precision="bf16-mixed", trainer__max_steps="2"), tmp_path)
    assert seen and all(s == t == torch.float32 for s, t, _ in seen)
    assert all(autocast for _, _, autocast in seen), "the rest of the step did run under bf16 autocast"
