"""The DINO linear-evaluation protocol (arXiv 2104.14294, App. B / Sec. 4.1).

A frozen backbone (eval mode, no gradients) under a single linear layer with no
BatchNorm, trained through RandomResizedCrop + horizontal flip with SGD (momentum 0.9,
no weight decay, lr 0.001 × batch / 256, cosine to 0) and evaluated on the resize →
centre-crop view. Slower than the feature-store probe of :mod:`ssl_xcit.eval.linear_grid`,
for numbers comparable with the papers.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from ssl_xcit.weights import LoadedBackbone
from ssl_xcit.eval.knn import true_class_rank
from ssl_xcit.eval.export import Precision, Transformed, embed, eval_transform


def train_transform(crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(crop, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=mean, std=std),
    ])


class LinearEvaluation(pl.LightningModule):
    """Frozen backbone + ``nn.Linear(dim, num_classes)`` initialised N(0, 0.01), bias 0."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, lr: float, epochs: int) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.lr, self.epochs = lr, epochs
        self.correct = {1: 0, 5: 0}
        self.seen = 0

    def train(self, mode: bool = True) -> "LinearEvaluation":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics never move
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = embed(self.backbone, images)
        return self.linear(features.float())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("linear/train_loss", loss, prog_bar=True)
        return loss

    def on_test_epoch_start(self) -> None:
        self.correct, self.seen = {1: 0, 5: 0}, 0

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        rank = true_class_rank(logits.float().cpu().numpy(), labels.cpu().numpy())
        for k in self.correct:
            self.correct[k] += int((rank < k).sum())
        self.seen += len(labels)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.linear.parameters(), lr=self.lr, momentum=0.9, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs, eta_min=0.0)
        return [optimizer], [schedule]


def dino_linear_eval(
    loaded: LoadedBackbone,
    train_source: Dataset,
    test_source: Dataset,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    base_lr: float = 0.001,
    resize: int = 256,
    crop: int = 224,
    num_workers: int = 4,
    accelerator: str = "auto",
    seed: int = 0,
    precision: Precision = "fp32",
) -> dict[str, Any]:
    """Train the linear layer for ``epochs`` and report top-1/top-5 (percent) on the test set.

    ``precision`` "fp32" runs backbone and layer in float32; "bf16" under bf16 autocast.
    """
    pl.seed_everything(seed, verbose=False)
    with torch.no_grad():
        probe = eval_transform(resize, crop, loaded.mean, loaded.std)(train_source[0][0]).unsqueeze(0)
        dim = embed(loaded.model.eval(), probe).shape[-1]
    lr = base_lr * batch_size / 256
    module = LinearEvaluation(loaded.model, dim, num_classes, lr, epochs)
    train = DataLoader(Transformed(train_source, train_transform(crop, loaded.mean, loaded.std)), batch_size=batch_size,
                       shuffle=True, drop_last=len(train_source) > batch_size, num_workers=num_workers)
    test = DataLoader(Transformed(test_source, eval_transform(resize, crop, loaded.mean, loaded.std)),
                      batch_size=batch_size, num_workers=num_workers)
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         precision="bf16-mixed" if precision == "bf16" else "32-true")
    with warnings.catch_warnings():  # the frozen backbone is in eval mode on purpose
        warnings.filterwarnings("ignore", message="Found .* module\\(s\\) in eval mode")
        trainer.fit(module, train)
    trainer.test(module, test, verbose=False)
    top5: Optional[float] = 100.0 * module.correct[5] / module.seen if num_classes >= 5 else None
    return {"protocol": "dino", "epochs": epochs, "batch_size": batch_size, "lr": lr, "dim": dim,
            "num_train": len(train_source), "num_test": module.seen,
            "test_top1": 100.0 * module.correct[1] / module.seen, "test_top5": top5}
