"""The options of ``ssl-xcit export | export-backbone | knn | linear``, one typed dataclass each.

The commands share groups of options by inheritance (which backbone, how images become
features, where the feature stores come from), so a key means the same in every command
and an evaluation protocol in ``eval/*.yaml`` is a plain file of these keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ssl_xcit.eval.export import Precision
from ssl_xcit.eval.knn import DEFAULT_KS
from ssl_xcit.eval.linear_grid import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS


@dataclass
class BackboneOptions:
    """Which backbone to evaluate."""

    checkpoint: Optional[str] = None
    """An ssl-xcit .ckpt, an exported .safetensors, an official DINO/XCiT .pth, or 'random':
    a randomly initialised --arch (the floor every learned feature must beat)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of an ssl-xcit or official checkpoint (DINO evaluates the teacher)."""
    arch: Optional[str] = None
    """timm XCiT name; needed for official checkpoints and for 'random'."""
    init_seed: int = 0
    """Seed of --checkpoint random's initialisation (same seed, same features)."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """timm keyword overrides of --checkpoint random's --arch, as the run's model.backbone_kwargs
    (e.g. {depth: 6}), so that the floor is the same architecture."""


@dataclass
class TransformOptions:
    """How images become features: DINO's evaluation transform and the pooled feature."""

    resize: int = 256
    """Short side before the centre crop (bicubic); e.g. --resize 32 --crop 32 for CIFAR."""
    crop: int = 224
    """Side of the centre crop."""
    mean: Optional[tuple[float, float, float]] = None
    """Normalisation mean; default: the checkpoint's training normalisation (ImageNet's when it has none)."""
    std: Optional[tuple[float, float, float]] = None
    """Normalisation std; default: as for mean."""
    variant: Literal["cls", "cls+avgpool"] = "cls"
    """cls: the class token (DINO's feature); cls+avgpool: class token + mean patch token."""
    batch_size: int = 256
    """Images per forward pass."""
    precision: Precision = "fp32"
    """Backbone arithmetic: fp32, float32; bf16, bf16 autocast (faster on GPUs, features good to bf16's
    ~3 significant digits; linear dino also trains its layer under it). Features are stored as float32."""
    num_workers: int = min(4, os.cpu_count() or 1)
    """Data-loading processes."""
    cache_dir: str = "~/.cache/ssl-xcit"
    """Where archives are extracted."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class ProtocolOptions(TransformOptions):
    """An evaluation protocol (a file in eval/): every evaluation command reads all of these
    keys, so one file serves export, knn and linear alike; each command uses its own."""

    k: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    """knn: neighbour counts; one search at the largest serves them all."""
    temperature: float = 0.07
    """knn: vote weight exp(cosine similarity / temperature)."""
    backend: Literal["faiss", "torch"] = "faiss"
    """knn: faiss (a GPU index when available) or torch (chunked matmul + top-k)."""
    protocol: Literal["fast", "dino"] = "fast"
    """linear: fast, a grid of heads on feature stores chosen on a validation split; dino, a
    linear layer on the frozen backbone trained through RandomResizedCrop + flip (the paper's)."""
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    """linear fast: learning rates of the grid."""
    weight_decays: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS))
    """linear fast: weight decays of the grid."""
    epochs: int = 100
    """linear: passes over the training set."""
    val_fraction: float = 0.1
    """linear fast: share of the training set held out (per class) to choose the head."""
    seed: int = 0
    """linear: seeds the validation split and the heads' initialisation."""
    base_lr: float = 0.001
    """linear dino: lr at batch 256, scaled linearly with the batch."""


@dataclass
class ExportOptions(ProtocolOptions, BackboneOptions):
    """ssl-xcit export: frozen features of a backbone over a labelled dataset."""

    data: Optional[str] = None
    """Labelled images: an ImageFolder directory, a .tar.gz of one, or cifar10 (required)."""
    split: Optional[str] = None
    """Sub-folder, e.g. train; a list such as val,test takes the first that exists."""
    max_images: Optional[int] = None
    """Use a fixed random subset of this many images."""
    out: Optional[str] = None
    """Feature store folder to write (required)."""


@dataclass
class ExportBackboneOptions(BackboneOptions):
    """ssl-xcit export-backbone: the backbone as safetensors that timm.create_model loads."""

    out: Optional[str] = None
    """Output .safetensors file (required)."""


@dataclass
class EvaluateOptions(ProtocolOptions, BackboneOptions):
    """ssl-xcit knn | linear: two feature stores (--train, --test), or a checkpoint and images to
    export them from, evaluated by the protocol's k-NN or linear probe."""

    train: Optional[str] = None
    """Training feature store (the k-NN bank, the probe's training set)."""
    test: Optional[str] = None
    """Test feature store."""
    train_data: Optional[str] = None
    """Labelled training images, exported on the fly with --checkpoint."""
    train_split: Optional[str] = None
    """Default: train when present."""
    test_data: Optional[str] = None
    """Labelled test images; default: --train-data."""
    test_split: Optional[str] = None
    """Default: val or test when present."""
    max_train_images: Optional[int] = None
    max_test_images: Optional[int] = None
    holdout_fraction: Optional[float] = None
    """knn: classify this share of each class of the training images against the rest of them,
    instead of a test split: for choosing settings without the test set (the images the k-NN
    monitor holds out, at the same fraction: the same seed)."""
    features_dir: str = "~/.cache/ssl-xcit/features"
    """Where on-the-fly feature stores are kept (and resumed, and reused)."""
    out: Optional[str] = None
    """Write the JSON report here."""


@dataclass
class DenseOptions:
    """How images become patch-feature grids (ssl-xcit dense-export, segment)."""

    height: Optional[int] = None
    """Height every image is resized to (bicubic), a multiple of the patch size; with --width.
    Default: the images' own size, which they must then share."""
    width: Optional[int] = None
    """Width every image is resized to; with --height."""
    blocks: int = 1
    """Patch tokens of the last this many XCA blocks, each after the final norm, concatenated."""
    window: Optional[int] = None
    """Sliding window side in pixels (a multiple of the patch size): each window is embedded apart
    and a patch gets the mean of its windows' features. Default: the whole image at once."""
    stride: Optional[int] = None
    """Step between sliding windows (default: --window, no overlap)."""
    mean: Optional[tuple[float, float, float]] = None
    """Normalisation mean; default: the checkpoint's training normalisation (ImageNet's when it has none)."""
    std: Optional[tuple[float, float, float]] = None
    """Normalisation std; default: as for mean."""
    precision: Precision = "fp32"
    """Backbone arithmetic: fp32, or bf16 autocast. Features are stored as float16 either way."""
    batch_size: int = 8
    """Images per forward pass."""
    num_workers: int = min(2, os.cpu_count() or 1)
    """Data-loading processes."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class DenseExportOptions(DenseOptions, BackboneOptions):
    """ssl-xcit dense-export: per-patch features of a frozen backbone over a folder of images."""

    images: Optional[str] = None
    """Folder of images (required)."""
    split_list: Optional[str] = None
    """File of image stems, one per line: export those, in that order (default: every image, by name)."""
    out: Optional[str] = None
    """Dense feature store folder to write (required); rerun the same command to resume it."""


@dataclass
class SegmentOptions(DenseOptions, BackboneOptions):
    """ssl-xcit segment: linear segmentation probe on frozen patch features (BatchNorm + 1x1 conv)."""

    images: Optional[str] = None
    """Folder of images (required)."""
    masks: Optional[str] = None
    """Folder of masks (required): single-channel PNGs of class indices, same stems as the images."""
    splits: Optional[str] = None
    """Folder of split lists train.txt, test.txt and optionally val.txt (stems, one per line).
    Without val.txt, --val-fraction of train is the validation split; without --splits, test
    and validation are carved from all images (seeded)."""
    classes: Optional[str] = None
    """Class names file (required), '<index> <name>' or '<name>' per line; the ignore label's line,
    if listed, is skipped."""
    ignore_label: Optional[int] = 255
    """Mask value counted nowhere (no loss, no score)."""
    test_height: Optional[int] = None
    """Height of the validation and test images (default: --height): the test-time resolution."""
    test_width: Optional[int] = None
    """Width of the validation and test images (default: --width)."""
    test_window: Optional[int] = None
    """Sliding window at test time (default: --window; none: whole image)."""
    test_stride: Optional[int] = None
    """Sliding window stride at test time (default: --stride)."""
    lrs: list[float] = field(default_factory=lambda: [3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    """AdamW learning rates tried; the one with the best validation mIoU is tested (BatchNorm'd
    features and a few hundred steps want large ones: docs/dense.md)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    epochs: int = 10
    """Passes over the training images per learning rate (the lr decays linearly to 0)."""
    probe_batch_size: int = 8
    """Images per probe step."""
    probe_pixels: int = 4096
    """Pixels per image in each step's loss, drawn among the counted ones (the upsampled logits
    read there only; an unbiased estimate of the image's loss at a fraction of the cost); 0: all."""
    val_fraction: float = 0.1
    """Share of the training images held out for validation when there is no val.txt."""
    test_fraction: float = 0.2
    """Share of all images held out for test when there are no split lists."""
    seed: int = 0
    """Seeds the carved splits, the probe's initialisation and its batch order."""
    features_dir: str = "~/.cache/ssl-xcit/dense"
    """Where the dense stores are kept (and resumed, and reused)."""
    out: Optional[str] = None
    """Folder for report.json and predictions.png (required)."""
    show: int = 4
    """Test images drawn in predictions.png (image | ground truth | prediction)."""


@dataclass
class ForegroundOptions(BackboneOptions):
    """ssl-xcit foreground: class-attention masks scored by IoU against binary foreground masks."""

    images: Optional[str] = None
    """Folder of images (required)."""
    masks: Optional[str] = None
    """Folder of binary masks (required), same stems: a pixel above 127 is foreground."""
    size: int = 224
    """Short side the image is resized to (bicubic); the long side is rounded to the patch grid."""
    keep: float = 0.6
    """Share of the attention mass the mask keeps (DINO's 0.6)."""
    box: float = 0.5
    """Side of the centred-box baseline, as a share of each image side."""
    mean: Optional[tuple[float, float, float]] = None
    """Normalisation mean; default: the checkpoint's training normalisation (ImageNet's when it has none)."""
    std: Optional[tuple[float, float, float]] = None
    """Normalisation std; default: as for mean."""
    out: Optional[str] = None
    """Folder for report.json and foreground.png (required)."""
    show: int = 6
    """Images drawn in foreground.png (image | mask | attention mask)."""
