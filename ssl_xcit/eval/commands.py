"""``ssl-xcit export | export-backbone | knn | linear``: evaluation of frozen features.

knn and linear read two feature stores (``--train DIR --test DIR``) or export them on the
fly from ``--checkpoint`` with ``--train-data``/``--test-data``; on-the-fly stores are
cached (and resumed) under ``--features-dir``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from ssl_xcit.weights import export_backbone, load_backbone
from ssl_xcit.options import one_line
from ssl_xcit.errors import UserError
from ssl_xcit.eval.feature_store import FeatureStore, check_compatible, load_feature_store
from ssl_xcit.eval.export import export_features
from ssl_xcit.eval.sharded_export import export_features_sharded, launched_world
from ssl_xcit.image_sources import build_source


def _parser(prog: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=prog, exit_on_error=False, description=description)


def _add_backbone_args(p: ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Optional[str], default=None,
                   help="ssl-xcit .ckpt, exported .safetensors, or an official DINO/XCiT .pth")
    p.add_argument("--which", type=str, default="teacher", help="teacher (DINO's choice) or student")
    p.add_argument("--arch", type=Optional[str], default=None, help="timm XCiT name; needed for official checkpoints")


def _add_export_args(p: ArgumentParser) -> None:
    p.add_argument("--resize", type=int, default=256, help="short side before the centre crop (bicubic)")
    p.add_argument("--crop", type=int, default=224, help="centre crop; e.g. --resize 32 --crop 32 for CIFAR")
    p.add_argument("--variant", type=str, default="cls", help="cls, or cls+avgpool (class token + mean patch token)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--cache-dir", type=str, default="~/.cache/ssl-xcit", help="where archives are extracted")
    p.add_argument("--progress", type=bool, default=True)


def _parse(p: ArgumentParser, argv: Sequence[str]) -> Namespace:
    try:
        return p.parse_args(list(argv))
    except ArgumentError as err:
        raise UserError(one_line(err)) from err


def _export(args: Namespace, data: str, split: Optional[str], max_images: Optional[int], out: Path,
            default_splits: tuple[str, ...]) -> Path:
    if args.variant not in ("cls", "cls+avgpool"):
        raise UserError(f"--variant: expected cls or cls+avgpool, got {args.variant}")
    loaded = load_backbone(args.checkpoint, args.which, args.arch)
    source = build_source(data, split, args.cache_dir, max_images, default_splits=default_splits)
    meta = {"data": data, "split": split, "max_images": max_images}
    kwargs = dict(resize=args.resize, crop=args.crop, variant=args.variant, batch_size=args.batch_size,
                  num_workers=args.num_workers, meta=meta, progress=args.progress)
    if launched_world()[1] > 1:  # started by torchrun: every process exports a shard
        return export_features_sharded(loaded, source, out, **kwargs)
    return export_features(loaded, source, out, **kwargs)


def export_command(argv: Sequence[str]) -> int:
    p = _parser("ssl-xcit export", "Write the frozen features of a backbone over a labelled dataset.")
    _add_backbone_args(p)
    _add_export_args(p)
    p.add_argument("--data", type=str, required=True, help="ImageFolder dir, .tar.gz of one, cifar10")
    p.add_argument("--split", type=Optional[str], default=None,
                   help="sub-folder, e.g. train; a list such as val,test takes the first that exists")
    p.add_argument("--max-images", type=Optional[int], default=None)
    p.add_argument("--out", type=str, required=True, help="feature store folder")
    args = _parse(p, argv)
    if not args.checkpoint:
        raise UserError("--checkpoint is required")
    candidates = tuple(args.split.split(",")) if args.split and "," in args.split else None
    split = None if candidates else args.split
    out = _export(args, args.data, split, args.max_images, Path(args.out), candidates or ("train",))
    print(f"features written to {out}")
    return 0


def export_backbone_command(argv: Sequence[str]) -> int:
    p = _parser("ssl-xcit export-backbone", "Write a backbone as safetensors that timm.create_model loads.")
    _add_backbone_args(p)
    p.add_argument("--out", type=str, required=True, help="output .safetensors file")
    args = _parse(p, argv)
    if not args.checkpoint:
        raise UserError("--checkpoint is required")
    loaded = load_backbone(args.checkpoint, args.which, args.arch)
    out = export_backbone(loaded, args.out)
    print(f"{loaded.arch} backbone written to {out}\nload it with: timm.create_model('{loaded.arch}', pretrained=True, "
          f"num_classes=0, pretrained_cfg_overlay=dict(file='{out}'))")
    return 0


def _add_store_inputs(p: ArgumentParser) -> None:
    p.add_argument("--train", type=Optional[str], default=None, help="training feature store")
    p.add_argument("--test", type=Optional[str], default=None, help="test feature store")
    _add_backbone_args(p)
    _add_export_args(p)
    p.add_argument("--train-data", type=Optional[str], default=None)
    p.add_argument("--train-split", type=Optional[str], default=None, help="default: train when present")
    p.add_argument("--test-data", type=Optional[str], default=None, help="default: --train-data")
    p.add_argument("--test-split", type=Optional[str], default=None, help="default: val or test when present")
    p.add_argument("--max-train-images", type=Optional[int], default=None)
    p.add_argument("--max-test-images", type=Optional[int], default=None)
    p.add_argument("--features-dir", type=str, default="~/.cache/ssl-xcit/features",
                   help="where on-the-fly feature stores are kept (and resumed)")
    p.add_argument("--out", type=Optional[str], default=None, help="write the JSON report here")


def _store_key(args: Namespace, data: str, split: Optional[str], max_images: Optional[int],
               default_splits: tuple[str, ...]) -> str:
    """A name for the store of these features; ``default_splits`` tells train from test
    when both come from one dataset with no explicit split."""
    ckpt = Path(args.checkpoint)
    stamp = f"{ckpt.resolve()}:{ckpt.stat().st_mtime_ns}:{args.which}:{args.arch}:{data}:{split}:{default_splits}:" \
            f"{max_images}:{args.resize}:{args.crop}:{args.variant}"
    return hashlib.sha1(stamp.encode()).hexdigest()[:16]


def _stores(args: Namespace) -> tuple[FeatureStore, FeatureStore]:
    """The (train, test) feature stores the arguments name, exporting them if needed."""
    if args.train or args.test:
        if not (args.train and args.test):
            raise UserError("--train and --test go together (or use --checkpoint with --train-data)")
        if args.checkpoint or args.train_data:
            raise UserError("give either --train/--test feature stores or --checkpoint with --train-data, not both")
        train, test = load_feature_store(args.train), load_feature_store(args.test)
    else:
        if not (args.checkpoint and args.train_data):
            raise UserError("give --train DIR --test DIR, or --checkpoint CKPT --train-data PATH [--test-data PATH]")
        root = Path(args.features_dir).expanduser()
        test_data = args.test_data or args.train_data
        splits = [(args.train_data, args.train_split, args.max_train_images, ("train",)),
                  (test_data, args.test_split, args.max_test_images, ("val", "test"))]
        train, test = (
            _load_or_export(args, data, split, limit, root / _store_key(args, data, split, limit, defaults), defaults)
            for data, split, limit, defaults in splits
        )
    check_compatible(train, test)
    return train, test


def _load_or_export(args: Namespace, data: str, split: Optional[str], limit: Optional[int], out: Path,
                    default_splits: tuple[str, ...]) -> FeatureStore:
    if not (out / "meta.json").exists():
        _export(args, data, split, limit, out, default_splits)
    return load_feature_store(out)


def _write_report(report: dict[str, Any], out: Optional[str]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {out}")


def knn_command(argv: Sequence[str]) -> int:
    from ssl_xcit.eval.knn import DEFAULT_KS, format_table, knn_evaluate

    p = _parser("ssl-xcit knn", "Weighted k-NN classification (DINO protocol) on frozen features.")
    _add_store_inputs(p)
    p.add_argument("--k", type=int, default=list(DEFAULT_KS), nargs="+")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--backend", type=str, default="faiss", help="faiss (GPU index when available) or torch")
    args = _parse(p, argv)
    train, test = _stores(args)
    report = knn_evaluate(train.features, train.labels, test.features, test.labels, ks=args.k,
                          temperature=args.temperature, backend=args.backend)
    report.update(train_store=str(train.root), test_store=str(test.root), checkpoint=train.meta.get("checkpoint"))
    print(format_table(report))
    _write_report(report, args.out)
    return 0


def linear_command(argv: Sequence[str]) -> int:
    from ssl_xcit.eval.linear_grid import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, linear_probe

    p = _parser("ssl-xcit linear", "Linear probe on frozen features: a grid of heads trained at once.")
    _add_store_inputs(p)
    p.add_argument("--lrs", type=float, default=list(DEFAULT_LRS), nargs="+")
    p.add_argument("--weight-decays", type=float, default=list(DEFAULT_WEIGHT_DECAYS), nargs="+")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the training set, to choose the head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", type=str, default="fast",
                   help="fast: heads on feature stores; dino: frozen backbone + linear layer through augmentations")
    p.add_argument("--base-lr", type=float, default=0.001, help="dino protocol: lr at batch 256 (scaled linearly)")
    args = _parse(p, argv)
    if args.protocol == "dino":
        return _dino_protocol(args)
    if args.protocol != "fast":
        raise UserError(f"--protocol: expected fast or dino, got {args.protocol}")
    train, test = _stores(args)
    report = linear_probe(train.features, train.labels, test.features, test.labels, lrs=args.lrs,
                          weight_decays=args.weight_decays, epochs=args.epochs, val_fraction=args.val_fraction,
                          seed=args.seed)
    report.update(train_store=str(train.root), test_store=str(test.root), checkpoint=train.meta.get("checkpoint"))
    top5 = "-" if report.get("test_top5") is None else f"{report['test_top5']:.2f}"
    print(f"linear probe: best lr {report['best_lr']} wd {report['best_weight_decay']} "
          f"(val top1 {report['best_val_top1']:.2f}) -> test top1 {report['test_top1']:.2f}, top5 {top5}")
    if report["best_lr"] in (min(args.lrs), max(args.lrs)) and len(args.lrs) > 1:
        print(f"warning: the best lr {report['best_lr']} is at the edge of the grid; widen --lrs", file=sys.stderr)
    _write_report(report, args.out)
    return 0


def _dino_protocol(args: Namespace) -> int:
    from ssl_xcit.eval.linear_dino import dino_linear_eval
    from ssl_xcit.image_sources import describe

    if not (args.checkpoint and args.train_data) or args.train or args.test:
        raise UserError("--protocol dino trains through images: give --checkpoint and --train-data [--test-data]")
    loaded = load_backbone(args.checkpoint, args.which, args.arch)
    train = build_source(args.train_data, args.train_split, args.cache_dir, args.max_train_images)
    test = build_source(args.test_data or args.train_data, args.test_split, args.cache_dir, args.max_test_images,
                        default_splits=("val", "test"))
    report = dino_linear_eval(loaded, train, test, len(describe(train)[2]), epochs=args.epochs,
                              batch_size=args.batch_size, base_lr=args.base_lr, resize=args.resize, crop=args.crop,
                              num_workers=args.num_workers, seed=args.seed)
    report["checkpoint"] = loaded.source
    top5 = "-" if report["test_top5"] is None else f"{report['test_top5']:.2f}"
    print(f"linear probe (DINO protocol, {args.epochs} epochs): test top1 {report['test_top1']:.2f}, top5 {top5}")
    _write_report(report, args.out)
    return 0
