"""Training throughput of DINO pretraining: samples/s, peak memory and (on GPU) model FLOPs utilisation.

Runs the real LightningModule under a real Trainer. By default the crops are random uint8
tensors made once, so the figure is the model's (teacher forward, student forward and
backward, AdamW, EMA, and the crops' normalisation on the device); ``--data PATH`` feeds it
real images through the full multi-crop pipeline instead (``--data synthetic`` for
generated ones), with ``--augment-device workers|train``.

    python benchmarks/train_throughput.py --arch xcit_nano_12_p16_224 --batch 16 --device cpu
    python benchmarks/train_throughput.py --arch xcit_nano_12_p16_224 --batch 16 --data /tmp/imagenette2-224 --workers 2
    python benchmarks/train_throughput.py ... --data /tmp/imagenette2-224 --augment-device classic   # the reference
    python benchmarks/train_throughput.py --arch xcit_small_12_p16_224 --batch 128 --device cuda --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ssl_xcit.pretrain.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    TrainerConfig,
)
from ssl_xcit.pretrain.data import PretrainDataModule
from ssl_xcit.pretrain.module import DINOModule


class FixedCrops(Dataset):
    """The same random multi-crop sample, ``length`` times (no decoding, no augmentation): uint8
    crops, as the workers ship them, so the device's share (normalisation) is counted and the
    host copies a quarter of the bytes of floats."""

    def __init__(self, length: int, global_size: int, local_size: int, n_local: int) -> None:
        self.length = length
        g = torch.Generator().manual_seed(0)
        big, small = ((torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8)) for s in (global_size, local_size))
        self.crops = [big] * 2 + [small] * n_local

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, object]:
        return {"crops": self.crops, "bad": ""}  # the batch format the data module yields


class ClassicCrops(Dataset):
    """The images of a folder (searched recursively) through the classic PIL multi-crop pipeline."""

    def __init__(self, folder: str, transform) -> None:
        self.paths = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.paths:
            raise SystemExit(f"--data {folder}: no JPEG or PNG images (the classic pipeline reads an image folder)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {"crops": self.transform(self.paths[index]), "bad": ""}


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self._sync()
            self.end, self.steps = time.perf_counter(), trainer.global_step - self.warmup


def step_flops(module: DINOModule, crops: list[torch.Tensor]) -> int:
    """FLOPs of one training step: teacher forward on the 2 global crops, student forward + backward on all."""
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            module.teacher(crops[:2])
        module.student(crops).float().sum().backward()
    module.student.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="xcit_nano_12_p16_224")
    p.add_argument("--global-crops-size", type=int, default=224)
    p.add_argument("--local-crops-size", type=int, default=96)
    p.add_argument("--local-crops-number", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--batch", type=int, default=16, help="per-device batch size")
    p.add_argument("--precision", default=None, help="32-true, bf16-mixed ... (default: bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--data", default=None, help="an image folder or .tar.gz (or 'synthetic') through the full "
                   "augmentation; default: fixed uint8 crops, the model and the normalisation alone")
    p.add_argument("--augment-device", default="workers", choices=["workers", "train", "classic"],
                   help="classic: the classic PIL pipeline with DINO's parameters (augment_bench.py), in the "
                        "workers, as the reference; --data must then be an image folder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--channels-last", action="store_true", help="model.channels_last: true")
    p.add_argument("--compile", action="store_true", help="model.compile: true (compiled during the untimed warm-up steps)")
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--depth", type=int, default=None, help="backbone depth override (backbone_kwargs depth)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense TFLOP/s, for MFU")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cfg = PretrainConfig(
        model=ModelConfig(arch=args.arch, out_dim=args.out_dim, head_hidden_dim=args.head_hidden,
                          backbone_kwargs={} if args.depth is None else {"depth": args.depth},
                          channels_last=args.channels_last, compile=args.compile),
        data=DataConfig(path=args.data or "synthetic", batch_size_per_device=args.batch, num_workers=args.workers,
                        synthetic_size=args.batch * (args.steps + args.warmup + 1)),
        augment=AugmentConfig(global_crops_size=args.global_crops_size, local_crops_size=args.local_crops_size,
                              local_crops_number=args.local_crops_number, device=args.augment_device),
        trainer=TrainerConfig(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision),
    )
    module = DINOModule(cfg)
    sample = [torch.randn(3, s, s) for s in [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number]
    eager = DINOModule(replace(cfg, model=replace(cfg.model, compile=False))) if args.compile else module
    flops = step_flops(eager, [c.unsqueeze(0).repeat(args.batch, 1, 1, 1) for c in sample])  # counted eagerly
    timer = StepTimer(args.warmup)
    on_gpu = args.device == "cuda"
    precision = args.precision or ("bf16-mixed" if on_gpu else "32-true")
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=precision,
                         max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    if args.augment_device == "classic":
        # a sibling script: only this mode needs it
        from augment_bench import ClassicDINO

        data = ClassicCrops(args.data, ClassicDINO(cfg.augment))
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                                                         num_workers=args.workers, pin_memory=on_gpu))
    elif args.data:
        trainer.fit(module, datamodule=PretrainDataModule(cfg.data, cfg.augment))
    else:
        data = FixedCrops(args.batch * (args.steps + args.warmup + 1), args.global_crops_size,
                          args.local_crops_size, args.local_crops_number)
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, drop_last=True,
                                                         num_workers=2 if on_gpu else 0,  # collate beside the GPU
                                                         persistent_workers=on_gpu, pin_memory=on_gpu))
    seconds = timer.end - timer.start
    rate = timer.steps * args.batch / seconds
    layout = " channels_last" * args.channels_last + " compiled" * args.compile
    print(f"arch {args.arch}{layout}  crops 2x{args.global_crops_size}+{args.local_crops_number}x{args.local_crops_size}  "
          f"batch {args.batch}  precision {precision}  device {args.device}  data {args.data + ' augmented on ' + args.augment_device if args.data else 'fixed uint8 crops'}")
    print(f"samples/s        {rate:10.2f}   ({timer.steps} steps in {seconds:.2f} s)")
    print(f"step FLOPs       {flops / 1e12:10.3f} TFLOP  ({flops / args.batch / 1e9:.1f} GFLOP per image)")
    print(f"achieved         {flops * timer.steps / seconds / 1e12:10.3f} TFLOP/s")
    if args.peak_tflops:
        print(f"MFU              {flops * timer.steps / seconds / 1e12 / args.peak_tflops:10.1%}   (of {args.peak_tflops} TFLOP/s peak)")
    if args.device == "cuda":
        print(f"peak GPU memory  {torch.cuda.max_memory_allocated() / 2**30:10.2f} GiB")
    print(f"peak host RSS    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:10.2f} GiB")


if __name__ == "__main__":
    main()
