"""Run by test_ddp.py as a script: 2-process CPU DDP pretraining that dumps each rank's
center and teacher so the test can compare them. Lightning relaunches this file per rank."""

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.helpers
from tests.helpers import tiny_pretrain_args  # noqa: E402
from ssl_xcit.pretrain.command import parse_pretrain_args  # noqa: E402
from ssl_xcit.pretrain.run import run_pretraining  # noqa: E402


class DumpPerRank(pl.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.local_means = []

    def on_train_start(self, trainer, module):
        batch_center = module.loss_fn.batch_center

        def recording_batch_center(teacher_logits):
            self.local_means.append(teacher_logits.float().mean(dim=0, keepdim=True).detach().clone())
            return batch_center(teacher_logits)

        module.loss_fn.batch_center = recording_batch_center

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        state = {"center": module.loss_fn.center.clone(), "teacher": module.teacher.state_dict(),
                 "student": module.student.state_dict(), "batch": batch["crops"][0].clone(),
                 "world_size": trainer.world_size, "global_step": trainer.global_step,
                 "local_mean": self.local_means[-1]}
        torch.save(state, self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


def freeze_batchnorm() -> None:
    """BatchNorm from its running statistics (identity at init): per-sample outputs, so a
    2-process and a 1-process run see the same teacher logits (SyncBatchNorm is GPU-only)."""
    real = torch.nn.functional.batch_norm

    def frozen(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        return real(input, running_mean, running_var, weight, bias, False, momentum, eps)

    torch.nn.functional.batch_norm = frozen


if __name__ == "__main__":
    if os.environ.get("PROBE_FREEZE_BN"):
        freeze_batchnorm()
    out, extra = Path(sys.argv[1]), sys.argv[2:]
    args = tiny_pretrain_args("synthetic", out / "run", data__synthetic_size="32", data__synthetic_resolution="40",
                              data__batch_size_per_device="4", trainer__max_epochs="1", trainer__accelerator="cpu")
    cfg = parse_pretrain_args(args + extra)[0]
    run_pretraining(cfg, out / "run", extra_callbacks=[DumpPerRank(out)])
