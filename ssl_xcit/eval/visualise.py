"""``ssl-xcit attention``: class-attention maps (and ``--pca`` patch-feature colours) as PNG.

For each image: the image, the last class-attention block's map of each head, the head
mean, and DINO's mask (the patches holding ``--keep`` of the mean map's mass) laid over the
image. With ``--pca``, one more PNG per image: the image beside the first three principal
components of its patch features (computed over all the given images together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from ssl_xcit.backbones import patch_size
from ssl_xcit.errors import UserError
from ssl_xcit.eval.attention_maps import class_attention_maps, mass_mask, upsample
from ssl_xcit.eval.options import BackboneOptions
from ssl_xcit.eval.patch_pca import last_block_patch_features, pca_colours
from ssl_xcit.files import atomic_write
from ssl_xcit.image_sources import load_rgb
from ssl_xcit.options import parse_options
from ssl_xcit.plotting import pyplot
from ssl_xcit.weights import LoadedBackbone, load_backbone


@dataclass
class AttentionOptions(BackboneOptions):
    """Which backbone, which images, and where the pictures go."""

    images: list[str] = field(default_factory=list)
    """Image files, or folders whose images are all drawn."""
    out: Optional[str] = None
    """Folder for the PNGs (<image name>_attention.png, <image name>_pca.png)."""
    size: int = 448
    """Short side the image is resized to (bicubic); each side is then cut to a multiple of the
    patch size. XCiT has no fixed grid: larger gives finer maps (at 448, p16 gives 28x28 patches)."""
    keep: float = 0.6
    """Share of the attention mass the mask keeps (DINO's 0.6)."""
    pca: bool = False
    """Also draw the patch-feature PCA (square crops of side --size, all images in one PCA)."""
    pca_threshold: float = 0.5
    """Foreground threshold on the first principal component, scaled to [0, 1]."""


def image_paths(entries: Sequence[str]) -> list[Path]:
    """The files given, and the image files inside the folders given, in order."""
    paths: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"--images: {entry} does not exist")
    if not paths:
        raise UserError("--images: no image given (files or folders of images)")
    return paths


def fit_to_patches(image: Image.Image, size: int, patch: int, square: bool = False) -> Image.Image:
    """Short side resized to ``size``, then centre-cut to multiples of ``patch`` (to a square
    of side ``size`` rounded down to the patch size when ``square``)."""
    scale = size / min(image.size)
    image = image.resize((max(patch, round(image.width * scale)), max(patch, round(image.height * scale))),
                         Image.BICUBIC)
    width = (min(image.size) if square else image.width) // patch * patch
    height = (min(image.size) if square else image.height) // patch * patch
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image, loaded: LoadedBackbone) -> torch.Tensor:
    """RGB PIL → (1, 3, H, W) normalised with the backbone's training mean/std."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(loaded.mean).view(3, 1, 1), torch.tensor(loaded.std).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def draw_attention(image: Image.Image, maps: torch.Tensor, keep: float, patch: int, title: str, out: Path) -> Path:
    """One row: the image, each head's map, the mean map, and the mask over the image."""
    plt = pyplot("ssl-xcit attention")
    mean = maps.mean(dim=0, keepdim=True)
    mask = upsample(mass_mask(mean, keep)[None].float(), patch)[0, 0].numpy() > 0.5
    pixels = np.asarray(image)
    masked = (pixels * np.where(mask[..., None], 1.0, 0.25)).astype(np.uint8)
    panels = [("image", pixels)] + [(f"head {i}", m) for i, m in enumerate(upsample(maps[None], patch)[0].numpy())]
    panels += [("mean of heads", upsample(mean[None], patch)[0, 0].numpy()), (f"mask: {keep:.0%} of mass", masked)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture, cmap="inferno" if picture.ndim == 2 else None)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out


MIN_PICTURE_SIDE = 256


def draw_pca(image: Image.Image, colours: torch.Tensor, out: Path) -> Path:
    """The image beside its patch colours (each patch a block of its colour), enlarged by a
    whole factor (nearest pixel) until it is at least MIN_PICTURE_SIDE high, so that a
    32-px image is still seen."""
    patch = image.height // colours.shape[0]
    rgb = (upsample(colours.permute(2, 0, 1)[None], patch)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    side_by_side = np.concatenate([np.asarray(image), rgb], axis=1)
    factor = -(-MIN_PICTURE_SIDE // side_by_side.shape[0])
    side_by_side = side_by_side.repeat(factor, axis=0).repeat(factor, axis=1)
    atomic_write(out, lambda f: Image.fromarray(side_by_side).save(f, format="PNG"))
    return out


def output_names(paths: Sequence[Path]) -> list[str]:
    """File stems; where two images share one, ``<folder>_<stem>`` (class folders keep their
    names), and the position in front where that is not unique either."""
    stems = [p.stem for p in paths]
    named = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{i:03d}_{n}" if named.count(n) > 1 else n for i, n in enumerate(named)]


def attention_command(argv: Sequence[str]) -> int:
    opts = parse_options(AttentionOptions, argv, "ssl-xcit attention", __doc__.splitlines()[0]).options
    if not opts.checkpoint or not opts.out:
        raise UserError("--checkpoint and --out are required")
    if not 0 < opts.keep <= 1:
        raise UserError(f"--keep: a share of the attention mass in (0, 1], got {opts.keep}")
    paths, out = image_paths(opts.images), Path(opts.out)
    loaded = load_backbone(opts.checkpoint, opts.which, opts.arch, opts.init_seed, opts.backbone_kwargs)
    patch = patch_size(loaded.model)
    names = output_names(paths)
    for path, name in zip(paths, names):
        image = fit_to_patches(load_rgb(str(path)), opts.size, patch)
        maps = class_attention_maps(loaded.model, to_tensor(image, loaded))[0]
        print(draw_attention(image, maps, opts.keep, patch, f"{path.name}: {loaded.source}", out / f"{name}_attention.png"))
    if opts.pca:
        squares = [fit_to_patches(load_rgb(str(p)), opts.size, patch, square=True) for p in paths]
        side = min(s.width for s in squares)
        squares = [s.resize((side, side), Image.BICUBIC) if s.width != side else s for s in squares]
        features = last_block_patch_features(loaded.model, torch.cat([to_tensor(s, loaded) for s in squares]))
        for square, colours, name in zip(squares, pca_colours(features, opts.pca_threshold), names):
            print(draw_pca(square, colours, out / f"{name}_pca.png"))
    return 0
