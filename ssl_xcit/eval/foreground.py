"""``ssl-xcit foreground``: foreground discovery from class attention, scored against binary masks.

For each image: the last class-attention block's map of every head and their mean
(:func:`~ssl_xcit.eval.attention_maps.class_attention_maps`), each thresholded as DINO's
visualisation does (the fewest patches holding ``keep`` of the attention mass,
:func:`~ssl_xcit.eval.attention_maps.mass_mask`), upsampled (nearest) to the mask's size and
scored by IoU against the mask. The set's figure is the mean of the per-image IoUs. The
baseline needing no network is a centred box; random weights of the same architecture are
the other (``--checkpoint random``, evaluated by this same command).

The image is resized (bicubic) so that its short side is ``size`` and each side is a whole
number of patches, without cropping, so that every mask pixel has a prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_xcit.backbones import patch_size
from ssl_xcit.errors import UserError
from ssl_xcit.eval.attention_maps import class_attention_maps, mass_mask
from ssl_xcit.eval.commands import _backbone, _with_normalisation
from ssl_xcit.eval.image_sets import image_stems, select
from ssl_xcit.eval.options import ForegroundOptions
from ssl_xcit.eval.visualise import to_tensor
from ssl_xcit.files import atomic_write, atomic_write_json
from ssl_xcit.image_sources import load_rgb
from ssl_xcit.options import parse_options
from ssl_xcit.plotting import pyplot
from ssl_xcit.weights import LoadedBackbone


def resize_to_patches(image: Image.Image, size: int, patch: int) -> Image.Image:
    """Short side to ``size``, each side then rounded to the nearest multiple of ``patch`` (at
    least one patch); bicubic, nothing cropped."""
    scale = size / min(image.size)
    width, height = (max(patch, round(side * scale / patch) * patch) for side in image.size)
    return image.resize((width, height), Image.BICUBIC)


def iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """|pred ∩ truth| / |pred ∪ truth| of two boolean masks of one shape (1 when both are empty)."""
    union = int((pred | truth).sum())
    return int((pred & truth).sum()) / union if union else 1.0


def centred_box(height: int, width: int, side: float) -> torch.Tensor:
    """(H, W) boolean: a box centred in the image, ``side`` of each side of it."""
    box = torch.zeros(height, width, dtype=torch.bool)
    bh, bw = round(side * height), round(side * width)
    top, left = (height - bh) // 2, (width - bw) // 2
    box[top:top + bh, left:left + bw] = True
    return box


def read_binary_mask(path: str) -> torch.Tensor:
    """(H, W) boolean: the pixels of a mask image above 127 (its first channel)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L")) > 127)


def thresholded_masks(maps: torch.Tensor, keep: float, out_size: tuple[int, int]) -> torch.Tensor:
    """(heads, h, w) attention maps → (heads + 1, H, W) boolean at ``out_size``: each map's
    patches holding ``keep`` of its mass, then the mean map's, upsampled (nearest)."""
    masks = mass_mask(torch.cat([maps, maps.mean(dim=0, keepdim=True)]), keep)
    return F.interpolate(masks[None].float(), size=out_size, mode="nearest")[0] > 0.5


def attention_masks(loaded: LoadedBackbone, image: Image.Image, size: int, keep: float,
                    out_size: tuple[int, int]) -> torch.Tensor:
    """(heads + 1, H, W) boolean at ``out_size``: :func:`thresholded_masks` of the image's class attention."""
    resized = resize_to_patches(image, size, patch_size(loaded.model))
    return thresholded_masks(class_attention_maps(loaded.model, to_tensor(resized, loaded))[0], keep, out_size)


def foreground_scores(loaded: LoadedBackbone, images: Sequence[str], masks: Sequence[str], size: int = 224,
                      keep: float = 0.6, box: float = 0.5) -> dict[str, Any]:
    """Mean IoU (percent) over the set of each head's mask, the mean map's mask and the centred box,
    with the per-image IoUs of the mean map and the box."""
    per_image = []
    for image_path, mask_path in zip(images, masks):
        truth = read_binary_mask(mask_path)
        image = load_rgb(image_path)
        if image.size != (truth.shape[1], truth.shape[0]):
            raise UserError(f"--masks: {mask_path} is {truth.shape[1]}x{truth.shape[0]}, its image "
                            f"{image.size[0]}x{image.size[1]}")
        predicted = attention_masks(loaded, image, size, keep, tuple(truth.shape))
        per_image.append([iou(m, truth) for m in predicted] + [iou(centred_box(*truth.shape, box), truth)])
    scores = 100.0 * np.array(per_image)  # (N, heads + 2)
    heads = scores.shape[1] - 2
    mean = scores.mean(axis=0)
    return {
        "num_images": len(scores), "size": size, "keep": keep, "box_side": box,
        "miou_mean_map": float(mean[heads]), "miou_heads": [float(v) for v in mean[:heads]],
        "miou_box": float(mean[heads + 1]),
        "per_image": [{"image": Path(p).stem, "iou_mean_map": float(s[heads]), "iou_box": float(s[heads + 1])}
                      for p, s in zip(images, scores)],
    }


def draw_foreground(loaded: LoadedBackbone, images: Sequence[str], masks: Sequence[str], size: int, keep: float,
                    title: str, out: Path) -> Path:
    """One row per image: the image, its mask, the mean map's thresholded attention over the image."""
    plt = pyplot("ssl-xcit foreground")
    fig, axes = plt.subplots(len(images), 3, figsize=(8, 2.4 * len(images) + 0.4), squeeze=False)
    for row, (image_path, mask_path) in enumerate(zip(images, masks)):
        truth = read_binary_mask(mask_path)
        image = load_rgb(image_path)
        predicted = attention_masks(loaded, image, size, keep, tuple(truth.shape))[-1]
        pixels = np.asarray(image)
        shown = (pixels * np.where(predicted.numpy()[..., None], 1.0, 0.25)).astype(np.uint8)
        panels = [(Path(image_path).stem, pixels), ("mask", truth.numpy()),
                  (f"attention: {keep:.0%} of mass, IoU {100 * iou(predicted, truth):.1f}", shown)]
        for ax, (name, picture) in zip(axes[row], panels):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return out


def foreground_command(argv: Sequence[str]) -> int:
    opts = parse_options(ForegroundOptions, argv, "ssl-xcit foreground", __doc__.splitlines()[0]).options
    if not (opts.checkpoint and opts.images and opts.masks and opts.out):
        raise UserError("--checkpoint, --images, --masks and --out are required")
    if not 0 < opts.keep <= 1 or not 0 < opts.box <= 1:
        raise UserError(f"--keep and --box are shares in (0, 1], got {opts.keep} and {opts.box}")
    images = image_stems(Path(opts.images).expanduser())
    stems = sorted(images)
    image_paths = select(images, stems, "--images")
    mask_paths = select(image_stems(Path(opts.masks).expanduser(), "--masks"), stems, "--masks")
    loaded = _with_normalisation(_backbone(opts), opts)
    report = foreground_scores(loaded, image_paths, mask_paths, opts.size, opts.keep, opts.box)
    report["checkpoint"] = loaded.source
    out = Path(opts.out).expanduser()
    atomic_write_json(out / "report.json", report)
    shown = np.linspace(0, len(stems) - 1, min(opts.show, len(stems))).round().astype(int).tolist()
    line = (f"foreground IoU over {report['num_images']} images: mean map {report['miou_mean_map']:.2f}, best head "
            f"{max(report['miou_heads']):.2f}, centred box ({opts.box:.0%} of each side) {report['miou_box']:.2f}")
    if shown:
        draw_foreground(loaded, [image_paths[i] for i in shown], [mask_paths[i] for i in shown], opts.size,
                        opts.keep, f"{loaded.source}\n{line}", out / "foreground.png")
    print(line)
    print(f"report and picture written to {out}")
    return 0
