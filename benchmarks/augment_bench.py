"""Multi-crop augmentation cost per sample on one core: ours against the classic PIL pipeline.

The classic pipeline is written here from DINO's published parameters (torchvision's PIL
transforms: RandomResizedCrop bicubic, flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
grayscale 0.2, PIL Gaussian blur σ∈U(0.1, 2) with p 1.0 / 0.1 / 0.5, solarize p=0.2 on
global crop 2, ToTensor + Normalize), decoding with ``Image.open(path).convert("RGB")``.
Ours: each path's two shares. ``augment.device: workers``: the worker does the whole recipe
and ships uint8 crops, the training device normalises them; ``augment.device: train``: the
worker decodes, crops and flips, the device does the colour work in batches (both device
shares timed here on this CPU). Every sample is run
through each pipeline in turn (interleaved), decode included; medians over all samples.

    python benchmarks/augment_bench.py --imagenette /tmp/aug-data/imagenette2-224/train \\
        --cifar /tmp/aug-data/CIFAR-10-images/train --images 200 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from ssl_xcit.pretrain.augment import (
    MultiCropAugmentation,
    color_on_device,
    normalize_crops,
)
from ssl_xcit.pretrain.config import AugmentConfig


class ClassicBlur:
    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class ClassicSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class ClassicDINO:
    """The classic multi-crop transform on PIL images, for any AugmentConfig."""

    def __init__(self, cfg: AugmentConfig) -> None:
        colour = [
            T.RandomHorizontalFlip(p=cfg.flip_p),
            T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ]
        norm = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
        crop = lambda size, scale: T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
        g, gs = cfg.global_crops_size, cfg.global_crops_scale
        self.global1 = T.Compose([crop(g, gs), *colour, ClassicBlur(cfg.blur_p_global1, cfg.blur_sigma), *norm])
        self.global2 = T.Compose([crop(g, gs), *colour, ClassicBlur(cfg.blur_p_global2, cfg.blur_sigma),
                                  ClassicSolarize(cfg.solarize_p_global2), *norm])
        self.local = T.Compose([crop(cfg.local_crops_size, cfg.local_crops_scale), *colour,
                                ClassicBlur(cfg.blur_p_local, cfg.blur_sigma), *norm])
        self.n_local = cfg.local_crops_number

    def __call__(self, path: str) -> list[torch.Tensor]:
        with Image.open(path) as img:
            image = img.convert("RGB")
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]


def bench(name: str, paths: list[str], cfg: AugmentConfig, rounds: int, batch: int) -> None:
    classic, ours = ClassicDINO(cfg), MultiCropAugmentation(cfg)
    times: dict[str, list[float]] = {"classic": [], "workers": [], "workers:device": [], "train:worker": [],
                                     "train:device": []}
    pending: list[dict] = []
    shipped: list[list[torch.Tensor]] = []

    def device_shares() -> None:
        collated = {"crops": [torch.stack([s["crops"][i] for s in pending]) for i in range(ours.n_crops)],
                    "params": torch.stack([s["params"] for s in pending])}
        start = time.perf_counter()
        color_on_device(collated, cfg)
        times["train:device"].append((time.perf_counter() - start) / len(pending))
        collated = [torch.stack([s[i] for s in shipped]) for i in range(ours.n_crops)]
        start = time.perf_counter()
        normalize_crops(collated, cfg)
        times["workers:device"].append((time.perf_counter() - start) / len(shipped))
        pending.clear()
        shipped.clear()

    seed = 0
    for _ in range(rounds):
        for path in paths:
            seed += 1
            random.seed(seed)
            torch.manual_seed(seed)
            for key, fn in (("classic", lambda: classic(path)),
                            ("workers", lambda: shipped.append(ours.worker_crops(path, seed))),
                            ("train:worker", lambda: pending.append(ours.geometric(path, seed)))):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
            if len(pending) == batch:
                device_shares()
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
    ref = ms["classic"]
    crops = f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}"
    print(f"\n{name}: {len(paths)} JPEGs x {rounds} rounds, crops {crops}, one thread, median ms/sample")
    row = lambda label, value, note: print(f"  {label:30s} {value:7.2f}   {note}")
    row("classic PIL (DINO), worker", ref, "the reference: the whole recipe in the worker")
    if "train:device" in ms:
        for path, what in (("workers", "uint8 -> normalised floats"), ("train", "batched colour")):
            w, d = ms["workers" if path == "workers" else "train:worker"], ms[f"{path}:device"]
            row(f"ours, device={path}, worker", w, f"classic/worker share = {ref / w:.2f}x")
            row(f"ours, device={path}, device", d, f"({what}, batches of {batch}, on this CPU)")
            row(f"ours, device={path}, total", w + d, f"classic/total = {ref / (w + d):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenette", type=Path, help="folder of Imagenette JPEGs (searched recursively)")
    p.add_argument("--cifar", type=Path, help="folder of CIFAR-10 JPEGs (searched recursively)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="samples per batched device-share call")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.imagenette:
        paths = sorted(str(f) for f in args.imagenette.rglob("*.JPEG"))[: args.images]
        bench("Imagenette (DINO recipe)", paths, AugmentConfig(), args.rounds, args.batch)
    if args.cifar:
        paths = sorted(str(f) for f in args.cifar.rglob("*.jpg"))[: args.images]
        cfg = AugmentConfig(global_crops_size=32, local_crops_size=16, local_crops_number=6,
                            local_crops_scale=(0.14, 0.4), blur_p_global1=0.0, blur_p_global2=0.0, blur_p_local=0.0,
                            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
        bench("CIFAR-10 (2x32 + 6x16 crops, blur off)", paths, cfg, args.rounds, args.batch)


if __name__ == "__main__":
    main()
