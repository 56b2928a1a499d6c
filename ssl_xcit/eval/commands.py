"""``ssl-xcit export | export-backbone | knn | linear``: evaluation of frozen features.

knn and linear read two feature stores (``--train DIR --test DIR``) or export them on the
fly from ``--checkpoint`` with ``--train-data``/``--test-data``; on-the-fly stores are
cached (and resumed) under ``--features-dir``. Every command takes ``--config FILE``
(e.g. a protocol from ``eval/``) and ``--key value`` overrides; see :mod:`ssl_xcit.eval.options`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ssl_xcit.errors import UserError
from ssl_xcit.eval.export import export_features
from ssl_xcit.eval.feature_store import FeatureStore, check_compatible, load_feature_store
from ssl_xcit.eval.options import (BackboneOptions, EvaluateOptions, ExportBackboneOptions, ExportOptions,
                                   TransformOptions)
from ssl_xcit.eval.sharded_export import export_features_sharded, launched_world
from ssl_xcit.files import atomic_write_json
from ssl_xcit.image_sources import build_source
from ssl_xcit.options import parse_options
from ssl_xcit.weights import RANDOM, LoadedBackbone, export_backbone, load_backbone


DESCRIPTIONS = {
    "export": "Write the frozen features of a backbone over a labelled dataset.",
    "export-backbone": "Write a backbone as safetensors that timm.create_model loads.",
    "knn": "Weighted k-NN classification (DINO protocol) on frozen features.",
    "linear": "Linear probe on frozen features: a grid of heads trained at once, or the DINO protocol.",
}


def _parse(options: type, argv: Sequence[str], name: str) -> Any:
    return parse_options(options, argv, f"ssl-xcit {name}", DESCRIPTIONS[name]).options


def _require(opts: Any, *keys: str) -> None:
    for key in keys:
        if not getattr(opts, key):
            raise UserError(f"--{key.replace('_', '-')} is required")


def _backbone(opts: BackboneOptions) -> LoadedBackbone:
    return load_backbone(opts.checkpoint, opts.which, opts.arch, opts.init_seed, opts.backbone_kwargs)  # type: ignore[arg-type]


def _with_normalisation(loaded: LoadedBackbone, opts: TransformOptions) -> LoadedBackbone:
    """The backbone with ``--mean``/``--std`` in place of its own, where given."""
    return dataclasses.replace(loaded, mean=tuple(opts.mean or loaded.mean), std=tuple(opts.std or loaded.std))


def _export(opts: Any, data: str, split: Optional[str], max_images: Optional[int], out: Path,
            default_splits: tuple[str, ...], option: str) -> Path:
    loaded = _with_normalisation(_backbone(opts), opts)
    source = build_source(data, split, opts.cache_dir, max_images, default_splits=default_splits, option=option)
    meta = {"data": data, "split": split, "max_images": max_images}
    kwargs = dict(resize=opts.resize, crop=opts.crop, variant=opts.variant, batch_size=opts.batch_size,
                  num_workers=opts.num_workers, meta=meta, progress=opts.progress, precision=opts.precision)
    if launched_world()[1] > 1:  # started by torchrun: every process exports a shard
        return export_features_sharded(loaded, source, out, **kwargs)
    return export_features(loaded, source, out, **kwargs)


def export_command(argv: Sequence[str]) -> int:
    opts: ExportOptions = _parse(ExportOptions, argv, "export")
    _require(opts, "checkpoint", "data", "out")
    candidates = tuple(opts.split.split(",")) if opts.split and "," in opts.split else None
    split = None if candidates else opts.split
    out = _export(opts, opts.data, split, opts.max_images, Path(opts.out), candidates or ("train",),  # type: ignore[arg-type]
                  "--data")
    print(f"features written to {out}")
    return 0


def export_backbone_command(argv: Sequence[str]) -> int:
    opts: ExportBackboneOptions = _parse(ExportBackboneOptions, argv, "export-backbone")
    _require(opts, "checkpoint", "out")
    loaded = _backbone(opts)
    out = export_backbone(loaded, opts.out)  # type: ignore[arg-type]
    print(f"{loaded.arch} backbone written to {out}\nload it with: timm.create_model('{loaded.arch}', pretrained=True, "
          f"num_classes=0, pretrained_cfg_overlay=dict(file='{out}'))")
    return 0


def _store_key(opts: EvaluateOptions, data: str, split: Optional[str], max_images: Optional[int],
               default_splits: tuple[str, ...]) -> str:
    """A name for the store of these features; ``default_splits`` tells train from test
    when both come from one dataset with no explicit split."""
    if opts.checkpoint == RANDOM:
        weights = f"{RANDOM}:{opts.init_seed}"
    else:
        ckpt = Path(opts.checkpoint)  # type: ignore[arg-type]
        weights = f"{ckpt.resolve()}:{ckpt.stat().st_mtime_ns}"
    stamp = f"{weights}:{opts.which}:{opts.arch}:{data}:{split}:{default_splits}:{max_images}:{opts.resize}:" \
            f"{opts.crop}:{opts.variant}:{opts.mean}:{opts.std}:{opts.precision}"
    return hashlib.sha1(stamp.encode()).hexdigest()[:16]


def _stores(opts: EvaluateOptions) -> tuple[FeatureStore, FeatureStore]:
    """The (train, test) feature stores the options name, exporting them if needed."""
    if opts.train or opts.test:
        if not (opts.train and opts.test):
            raise UserError("--train and --test go together (or use --checkpoint with --train-data)")
        if opts.checkpoint or opts.train_data:
            raise UserError("give either --train/--test feature stores or --checkpoint with --train-data, not both")
        train, test = load_feature_store(opts.train), load_feature_store(opts.test)
    else:
        if not (opts.checkpoint and opts.train_data):
            raise UserError("give --train DIR --test DIR, or --checkpoint CKPT --train-data PATH [--test-data PATH]")
        root = Path(opts.features_dir).expanduser()
        test_data = opts.test_data or opts.train_data
        splits = [(opts.train_data, opts.train_split, opts.max_train_images, ("train",), "--train-data"),
                  (test_data, opts.test_split, opts.max_test_images, ("val", "test"), "--test-data")]
        train, test = (
            _load_or_export(opts, data, split, limit, root / _store_key(opts, data, split, limit, defaults), defaults,
                            option)
            for data, split, limit, defaults, option in splits
        )
    check_compatible(train, test)
    return train, test


def _load_or_export(opts: EvaluateOptions, data: str, split: Optional[str], limit: Optional[int], out: Path,
                    default_splits: tuple[str, ...], option: str) -> FeatureStore:
    if not (out / "meta.json").exists():
        _export(opts, data, split, limit, out, default_splits, option)
    return load_feature_store(out)


def _write_report(report: dict[str, Any], out: Optional[str]) -> None:
    if out:
        atomic_write_json(Path(out), report)
        print(f"report written to {out}")


def _holdout_sets(opts: EvaluateOptions) -> tuple[FeatureStore, tuple[Any, Any, Any, Any]]:
    """The training store and (bank features, labels, query features, labels): the queries are
    ``--holdout-fraction`` of each class, the bank the rest."""
    from ssl_xcit.eval.linear_grid import HOLDOUT_SEED, stratified_split

    if opts.test or opts.test_data or opts.test_split:
        raise UserError("--holdout-fraction classifies held-out training images: give no --test, --test-data or "
                        "--test-split with it")
    if not 0.0 < opts.holdout_fraction < 1.0:  # type: ignore[operator]
        raise UserError(f"--holdout-fraction must be in (0, 1), got {opts.holdout_fraction}")
    if opts.train:
        train = load_feature_store(opts.train)
    else:
        if not (opts.checkpoint and opts.train_data):
            raise UserError("--holdout-fraction needs --train DIR, or --checkpoint CKPT --train-data PATH")
        key = _store_key(opts, opts.train_data, opts.train_split, opts.max_train_images, ("train",))
        train = _load_or_export(opts, opts.train_data, opts.train_split, opts.max_train_images,
                                Path(opts.features_dir).expanduser() / key, ("train",), "--train-data")
    bank, held = stratified_split(train.labels, opts.holdout_fraction, HOLDOUT_SEED)  # type: ignore[arg-type]
    if len(held) == 0:
        raise UserError(f"--holdout-fraction {opts.holdout_fraction} holds out no image of {train.root}; raise it")
    return train, (train.features[bank], train.labels[bank], train.features[held], train.labels[held])


def knn_command(argv: Sequence[str]) -> int:
    from ssl_xcit.eval.knn import format_table, knn_evaluate

    opts: EvaluateOptions = _parse(EvaluateOptions, argv, "knn")
    if opts.holdout_fraction is None:
        train, test = _stores(opts)
        arrays, queries = (train.features, train.labels, test.features, test.labels), str(test.root)
    else:
        train, arrays = _holdout_sets(opts)
        queries = f"{opts.holdout_fraction} of each class of {train.root}, held out (seed 0)"
    report = knn_evaluate(*arrays, ks=opts.k, temperature=opts.temperature, backend=opts.backend)
    report.update(train_store=str(train.root), test_store=queries, checkpoint=train.meta.get("checkpoint"))
    print(format_table(report))
    _write_report(report, opts.out)
    return 0


def linear_command(argv: Sequence[str]) -> int:
    from ssl_xcit.eval.linear_grid import linear_probe

    opts: EvaluateOptions = _parse(EvaluateOptions, argv, "linear")
    if opts.protocol == "dino":
        return _dino_protocol(opts)
    train, test = _stores(opts)
    report = linear_probe(train.features, train.labels, test.features, test.labels, lrs=opts.lrs,
                          weight_decays=opts.weight_decays, epochs=opts.epochs, val_fraction=opts.val_fraction,
                          seed=opts.seed)
    report.update(train_store=str(train.root), test_store=str(test.root), checkpoint=train.meta.get("checkpoint"))
    top5 = "-" if report.get("test_top5") is None else f"{report['test_top5']:.2f}"
    print(f"linear probe: best lr {report['best_lr']} wd {report['best_weight_decay']} "
          f"(val top1 {report['best_val_top1']:.2f}) -> test top1 {report['test_top1']:.2f}, top5 {top5}")
    if report["best_lr"] in (min(opts.lrs), max(opts.lrs)) and len(opts.lrs) > 1:
        print(f"warning: the best lr {report['best_lr']} is at the edge of the grid; widen --lrs", file=sys.stderr)
    _write_report(report, opts.out)
    return 0


def _dino_protocol(opts: EvaluateOptions) -> int:
    from ssl_xcit.eval.linear_dino import dino_linear_eval
    from ssl_xcit.image_sources import describe

    if not (opts.checkpoint and opts.train_data) or opts.train or opts.test:
        raise UserError("--protocol dino trains through images: give --checkpoint and --train-data [--test-data]")
    loaded = _with_normalisation(_backbone(opts), opts)
    train = build_source(opts.train_data, opts.train_split, opts.cache_dir, opts.max_train_images,
                         option="--train-data")
    test = build_source(opts.test_data or opts.train_data, opts.test_split, opts.cache_dir, opts.max_test_images,
                        default_splits=("val", "test"), option="--test-data")
    report = dino_linear_eval(loaded, train, test, len(describe(train)[2]), epochs=opts.epochs,
                              batch_size=opts.batch_size, base_lr=opts.base_lr, resize=opts.resize, crop=opts.crop,
                              num_workers=opts.num_workers, seed=opts.seed, precision=opts.precision)
    report["checkpoint"] = loaded.source
    top5 = "-" if report["test_top5"] is None else f"{report['test_top5']:.2f}"
    print(f"linear probe (DINO protocol, {opts.epochs} epochs): test top1 {report['test_top1']:.2f}, top5 {top5}")
    _write_report(report, opts.out)
    return 0
