"""``ssl-xcit segment``: the linear segmentation probe from a checkpoint and a folder of images and masks.

Each split's dense features are exported once into ``--features-dir`` (resumed when
interrupted, reused when asked again with the same weights, images and settings); the
training split at ``--height``/``--width`` (``--window``), validation and test at the
test-time settings. The probe (:mod:`ssl_xcit.eval.segmentation`) then writes
``report.json`` and ``predictions.png`` (image | ground truth | prediction) to ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ssl_xcit.backbones import patch_size
from ssl_xcit.errors import UserError
from ssl_xcit.eval.commands import _backbone, _with_normalisation
from ssl_xcit.eval.dense_export import dense_store_key, export_dense, input_size
from ssl_xcit.eval.dense_store import DenseStore, load_dense_store
from ssl_xcit.eval.image_sets import image_stems, read_class_names, read_mask, select, split_stems
from ssl_xcit.eval.options import SegmentOptions
from ssl_xcit.eval.segmentation import SegmentationSet, linear_segmentation, predict
from ssl_xcit.files import atomic_write, atomic_write_json
from ssl_xcit.image_sources import load_rgb
from ssl_xcit.options import parse_options
from ssl_xcit.plotting import pyplot
from ssl_xcit.weights import LoadedBackbone

Setting = tuple[tuple[int, int], Optional[int], Optional[int]]  # (H, W), window, stride


def dense_store(loaded: LoadedBackbone, opts: SegmentOptions, paths: list[str], setting: Setting) -> DenseStore:
    """The dense store of ``paths`` under ``setting``, exported (or resumed) first if needed."""
    size, window, stride = setting
    key = dense_store_key(loaded, str(opts.checkpoint), paths, size, opts.blocks, window, stride, opts.precision)
    root = Path(opts.features_dir).expanduser() / key
    if not (root / "meta.json").exists():
        export_dense(loaded, paths, root, size, opts.blocks, window, stride, opts.batch_size, opts.num_workers,
                     progress=opts.progress, precision=opts.precision)
    return load_dense_store(root)


def settings(opts: SegmentOptions, paths: dict[str, list[str]], patch: int) -> dict[str, Setting]:
    """Training resolution for train; the test-time one (each unset key taken from training) for val and test."""
    train = (input_size(paths["train"], patch, opts.height, opts.width, opts.window, opts.stride),
             opts.window, opts.stride)
    window = opts.test_window if opts.test_window is not None else opts.window
    stride = opts.test_stride if opts.test_stride is not None else opts.stride
    height = opts.test_height if opts.test_height is not None else opts.height
    width = opts.test_width if opts.test_width is not None else opts.width
    test = (input_size(paths["val"] + paths["test"], patch, height, width, window, stride), window, stride)
    return {"train": train, "val": test, "test": test}


def palette(num_classes: int) -> np.ndarray:
    """(K + 1, 3) uint8 colours: tab20's for the classes, black last (the ignore label)."""
    plt = pyplot("ssl-xcit segment")
    colours = [plt.get_cmap("tab20")(i % 20)[:3] for i in range(num_classes)] + [(0.0, 0.0, 0.0)]
    return (np.array(colours) * 255).astype(np.uint8)


def coloured(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) colours; anything outside [0, K) black."""
    k = len(colours) - 1
    return colours[np.where((mask >= 0) & (mask < k), mask, k)]


def draw_predictions(images: Sequence[str], masks: Sequence[np.ndarray], predictions: Sequence[torch.Tensor],
                     class_names: Sequence[str], title: str, out: Path) -> Path:
    """One row per image: the image, its ground truth, the prediction; a colour legend below."""
    plt = pyplot("ssl-xcit segment")
    colours = palette(len(class_names))
    fig, axes = plt.subplots(len(images), 3, figsize=(10, 3.0 * len(images) + 1.2), squeeze=False)
    for row, (path, mask, pred) in enumerate(zip(images, masks, predictions)):
        for ax, (name, picture) in zip(axes[row], [("image", np.asarray(load_rgb(path))),
                                                   ("ground truth (black: ignored)", coloured(mask, colours)),
                                                   ("prediction", coloured(pred.numpy(), colours))]):
            ax.imshow(picture)
            ax.set_title(f"{Path(path).stem}: {name}" if name == "image" else name, fontsize=8)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c / 255) for c in colours[:-1]]
    fig.legend(handles, class_names, loc="lower center", ncol=min(len(class_names), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95), h_pad=1.5)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return out


def _summary(report: dict[str, Any]) -> str:
    test = report["test"]
    return (f"linear segmentation: lr {report['best_lr']:g} (validation mIoU {report['val']['miou']:.2f}) -> test "
            f"mIoU {test['miou']:.2f}, pixel accuracy {test['pixel_accuracy']:.2f} over {report['num_test']} images")


def segment_command(argv: Sequence[str]) -> int:
    opts = parse_options(SegmentOptions, argv, "ssl-xcit segment", __doc__.splitlines()[0]).options
    if not (opts.checkpoint and opts.images and opts.masks and opts.classes and opts.out):
        raise UserError("--checkpoint, --images, --masks, --classes and --out are required")
    images, masks = image_stems(Path(opts.images).expanduser()), image_stems(Path(opts.masks).expanduser(), "--masks")
    splits = split_stems(sorted(images), Path(opts.splits).expanduser() if opts.splits else None, opts.val_fraction,
                         opts.test_fraction, opts.seed)
    class_names = read_class_names(Path(opts.classes).expanduser(), opts.ignore_label)
    paths = {name: select(images, stems, f"--splits ({name})") for name, stems in splits.items()}
    loaded = _with_normalisation(_backbone(opts), opts)
    setting = settings(opts, paths, patch_size(loaded.model))
    sets = {name: SegmentationSet(dense_store(loaded, opts, paths[name], setting[name]).features,
                                  [read_mask(m, len(class_names), opts.ignore_label)
                                   for m in select(masks, stems, "--masks")])
            for name, stems in splits.items()}
    report, head = linear_segmentation(sets["train"], sets["val"], sets["test"], class_names, opts.ignore_label,
                                       opts.lrs, opts.weight_decay, opts.epochs, opts.probe_batch_size, opts.seed,
                                       opts.probe_pixels)
    report.update(checkpoint=loaded.source, arch=loaded.arch, blocks=opts.blocks, class_names=class_names,
                  **{f"{name}_resolution": {"size": list(s[0]), "window": s[1], "stride": s[2]}
                     for name, s in (("train", setting["train"]), ("test", setting["test"]))})
    out = Path(opts.out).expanduser()
    atomic_write_json(out / "report.json", report)
    shown = np.linspace(0, len(sets["test"]) - 1, min(opts.show, len(sets["test"]))).round().astype(int).tolist()
    if shown:
        draw_predictions([paths["test"][i] for i in shown], [sets["test"].masks[i] for i in shown],
                         predict(head, sets["test"], shown), class_names, f"{loaded.source}\n{_summary(report)}",
                         out / "predictions.png")
    print(_summary(report))
    if len(opts.lrs) > 1 and report["best_lr"] in (min(opts.lrs), max(opts.lrs)):
        print(f"warning: the best lr {report['best_lr']:g} is at the edge of the grid; widen --lrs", file=sys.stderr)
    print(f"report and pictures written to {out}")
    return 0
