"""Dense features of a frozen backbone: every image's patch grid, written to a dense store.

The features are the patch tokens of the last XCA block (or the last ``blocks`` blocks,
concatenated along the channels), each passed through the backbone's final norm: timm's
``forward_intermediates(norm=True)``, the tokens before the class-attention layers, which
only read them. XCiT's positional encoding is computed for any grid, so any input whose
sides are multiples of the patch size works, and the cost grows linearly with the pixels.

Every image is resized (bicubic) to one size H x W; its features form an
(H / p, W / p, C) grid. With a sliding ``window``, windows of window x window pixels at
``stride`` (the last one flush with the border) are embedded apart and each patch gets the
mean of the features the windows covering it gave it; for a linear probe (BatchNorm and a
1x1 convolution are affine) that equals averaging the windows' logits, as segmentation
codebases do at test time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from ssl_xcit.backbones import patch_size
from ssl_xcit.devices import default_device
from ssl_xcit.errors import UserError
from ssl_xcit.eval.dense_store import DenseStoreWriter
from ssl_xcit.eval.export import Precision
from ssl_xcit.eval.image_sets import image_stems, read_stems, select
from ssl_xcit.image_sources import load_rgb
from ssl_xcit.weights import LoadedBackbone


@torch.no_grad()
def patch_features(backbone: nn.Module, images: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """(B, 3, H, W) → (B, H/p, W/p, blocks·C): the last ``blocks`` XCA blocks' patch tokens,
    each after the final norm, concatenated oldest block first."""
    maps = backbone.forward_intermediates(images, indices=blocks, norm=True, intermediates_only=True)
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1)  # [(B, C, h, w)] → (B, h, w, blocks·C)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of ``window`` along a side of ``length`` at ``stride``, the last one
    flush with the end (one window at 0 when the side is not longer than a window)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] == length - window else starts + [length - window]


@torch.no_grad()
def sliding_patch_features(backbone: nn.Module, image: torch.Tensor, window: int, stride: int,
                           blocks: int = 1) -> torch.Tensor:
    """(1, 3, H, W) → (1, H/p, W/p, blocks·C): per patch, the mean of its features over the
    windows (side ``window``, clipped to the image) that cover it."""
    p = patch_size(backbone)
    height, width = image.shape[-2:]
    wh, ww = min(window, height), min(window, width)
    boxes = [(top, left) for top in window_starts(height, wh, stride) for left in window_starts(width, ww, stride)]
    crops = torch.cat([image[..., top:top + wh, left:left + ww] for top, left in boxes])
    grids = patch_features(backbone, crops, blocks)  # (windows, wh/p, ww/p, C)
    total = torch.zeros(height // p, width // p, grids.shape[-1], device=grids.device, dtype=grids.dtype)
    count = torch.zeros(height // p, width // p, 1, device=grids.device, dtype=grids.dtype)
    for (top, left), grid in zip(boxes, grids):
        total[top // p:(top + wh) // p, left // p:(left + ww) // p] += grid
        count[top // p:(top + wh) // p, left // p:(left + ww) // p] += 1
    return (total / count)[None]


def dense_features(backbone: nn.Module, images: torch.Tensor, blocks: int = 1, window: Optional[int] = None,
                   stride: Optional[int] = None) -> torch.Tensor:
    """(B, 3, H, W) → (B, H/p, W/p, blocks·C): the whole image at once, or by sliding windows."""
    if window is None:
        return patch_features(backbone, images, blocks)
    return torch.cat([sliding_patch_features(backbone, x[None], window, stride or window, blocks) for x in images])


class ResizedImages(Dataset):
    """Image files → (3, H, W) normalised tensors, each resized (bicubic) to exactly H x W."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.paths = list(paths)
        self.transform = v2.Compose([
            v2.ToImage(), v2.RGB(), v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std)),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[index]))


def input_size(paths: Sequence[str], patch: int, height: Optional[int], width: Optional[int],
               window: Optional[int] = None, stride: Optional[int] = None) -> tuple[int, int]:
    """The (H, W) every image is resized to: ``height`` x ``width`` when given, else the images'
    own size, which they must share.

    Raises:
        UserError: sizes off the patch grid, images of several sizes with no ``height``/``width``
            given, or only one of the two given.
    """
    for name, value in (("--window", window), ("--stride", stride)):
        if value is not None and (value < patch or value % patch):
            raise UserError(f"{name} {value}: must be a positive multiple of the patch size {patch}")
    if (height is None) != (width is None):
        raise UserError("--height and --width go together (the size every image is resized to)")
    if height is not None and width is not None:
        if height % patch or width % patch or min(height, width) < patch:
            raise UserError(f"--height {height} --width {width}: both must be multiples of the patch size {patch}")
        return height, width
    first = Image.open(paths[0]).size
    for path in paths[1:]:
        size = Image.open(path).size
        if size != first:
            raise UserError(f"images differ in size ({first[0]}x{first[1]} for {paths[0]}, {size[0]}x{size[1]} for "
                            f"{path}): pass --height and --width to resize every image to one size")
    if first[0] % patch or first[1] % patch:
        raise UserError(f"the images are {first[0]}x{first[1]}, not multiples of the patch size {patch}: "
                        "pass --height and --width")
    return first[1], first[0]


def export_dense(
    loaded: LoadedBackbone,
    paths: Sequence[str],
    out_dir: Path,
    size: tuple[int, int],
    blocks: int = 1,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    num_workers: int = 2,
    device: Optional[torch.device] = None,
    meta: Optional[dict[str, Any]] = None,
    progress: bool = True,
    precision: Precision = "fp32",
) -> Path:
    """Writes the dense features of ``paths`` (each resized to ``size`` = (H, W)) to the store
    ``out_dir``; an interrupted export resumes at the first image not yet on disk.
    ``precision`` "bf16" runs the backbone under bf16 autocast."""
    device = device or default_device()
    model = loaded.model.to(device).eval()
    p = patch_size(model)
    channels = model.embed_dim * blocks
    full_meta = {"checkpoint": loaded.source, "arch": loaded.arch, "patch": p, "size": list(size), "blocks": blocks,
                 "window": window, "stride": stride, "interpolation": "bicubic", "mean": list(loaded.mean),
                 "std": list(loaded.std), "precision": precision, **(meta or {})}
    writer = DenseStoreWriter(out_dir, len(paths), (size[0] // p, size[1] // p, channels), full_meta)
    row = writer.rows_done
    dataset = ResizedImages(paths, size, loaded.mean, loaded.std)
    loader = DataLoader(Subset(dataset, range(row, len(paths))), batch_size=batch_size, num_workers=num_workers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for images in tqdm(loader, desc=f"dense export {out_dir.name}", disable=not progress):
        with autocast:
            grids = dense_features(model, images.to(device), blocks, window, stride)
        writer.write_grids(row, grids.float().cpu().numpy(), paths[row:row + len(grids)])
        row += len(grids)
    writer.finish()
    return out_dir


def weights_identity(loaded: LoadedBackbone, checkpoint: str) -> str:
    """What names these weights in a cache key: a file's path and modification time, or the
    random initialisation's arch, seed and overrides."""
    if loaded.source.startswith("random:"):
        return f"{loaded.source}:{sorted(loaded.extra.get('backbone_kwargs', {}).items())}"
    path = Path(checkpoint)
    return f"{path.resolve()}:{path.stat().st_mtime_ns}:{loaded.source}"


def dense_store_key(loaded: LoadedBackbone, checkpoint: str, paths: Sequence[str], size: tuple[int, int],
                    blocks: int, window: Optional[int], stride: Optional[int], precision: Precision) -> str:
    """A folder name for one dense store: the same weights, images and settings, the same name."""
    images = hashlib.sha1("\n".join(paths).encode()).hexdigest()
    stamp = (f"{weights_identity(loaded, checkpoint)}:{images}:{size}:{blocks}:{window}:{stride}:"
             f"{list(loaded.mean)}:{list(loaded.std)}:{precision}")
    return hashlib.sha1(stamp.encode()).hexdigest()[:16]


def dense_export_command(argv: Sequence[str]) -> int:
    from ssl_xcit.eval.commands import _backbone, _with_normalisation
    from ssl_xcit.eval.options import DenseExportOptions
    from ssl_xcit.options import parse_options

    opts: DenseExportOptions = parse_options(DenseExportOptions, argv, "ssl-xcit dense-export",
                                             __doc__.splitlines()[0]).options
    if not (opts.checkpoint and opts.images and opts.out):
        raise UserError("--checkpoint, --images and --out are required")
    images = image_stems(Path(opts.images).expanduser())
    stems = read_stems(Path(opts.split_list), "--split-list") if opts.split_list else sorted(images)
    paths = select(images, stems, "--split-list")
    loaded = _with_normalisation(_backbone(opts), opts)
    size = input_size(paths, patch_size(loaded.model), opts.height, opts.width, opts.window, opts.stride)
    out = export_dense(loaded, paths, Path(opts.out), size, opts.blocks, opts.window, opts.stride, opts.batch_size,
                       opts.num_workers, progress=opts.progress, precision=opts.precision)
    print(f"dense features of {len(paths)} images at {size[0]}x{size[1]} written to {out}")
    return 0
