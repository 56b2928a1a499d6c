"""The typed pretraining config: the single source of defaults.

Field names follow DINO's arguments (``out_dim``, ``norm_last_layer``, ``momentum_teacher``,
``teacher_temp``, ``local_crops_number`` ...) so that a run's ``config.yaml`` diffs against
a DINO ``args.txt``. YAML recipes in ``configs/`` hold only what differs from these
defaults; ``--section.key value`` overrides go on top (see :mod:`ssl_xcit.options`).
Defaults are DINO's ViT-S/16 recipe unless a comment says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@dataclass
class ModelConfig:
    """Backbone (any timm XCiT) and DINO head."""

    arch: str = "xcit_small_12_p16_224"
    """timm registry name of an XCiT model, e.g. xcit_nano_12_p16_224 ... xcit_large_24_p8_224."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the student (the teacher never drops paths)."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword overrides for timm.create_model, e.g. {depth: 2}."""
    out_dim: int = 65536
    """K, prototypes of the DINO head."""
    head_nlayers: int = 3
    """Linear layers of the head's MLP."""
    head_hidden_dim: int = 2048
    """Width of the head's hidden layers."""
    head_bottleneck_dim: int = 256
    """Size of the L2-normalised embedding compared with the prototypes."""
    use_bn_in_head: bool = False
    """BatchNorm in the head's MLP (DINO found it unnecessary for ViTs)."""
    norm_last_layer: bool = True
    """Freeze the last layer's weight-norm magnitude at 1 (True helps stability, False helps accuracy)."""
    channels_last: bool = False
    """Keep the convolution weights and the crops in channels-last memory (the patch embedding's
    convolutions, the positional encoding's 1x1 projection and XCiT's depth-wise local patch
    interaction); same values, another layout."""
    compile: bool = False
    """torch.compile each transformer block of the student's and the teacher's backbones in place
    (regional compilation: blocks of one kind share a graph, so compiling does not grow with depth).
    Graphs are built at the first steps (per crop size, student and teacher) and at the first k-NN
    monitor pass; needs a C++ compiler on CPU. docs/gpu_step.md has the measured costs and gains."""
    init: Optional[str] = None
    """Start student and teacher from trained weights: an official DINO full checkpoint (backbone,
    head, center), an official backbone-only or timm weights file, an ssl-xcit .ckpt or an exported
    .safetensors. The head is loaded when its shape fits, else re-initialised (said in one line).
    A new run: fresh optimizer and schedules. When resuming, the run folder's last.ckpt wins."""
    init_which: Literal["teacher", "student"] = "teacher"
    """Network of a checkpoint holding both that student and teacher start from."""


@dataclass
class DataConfig:
    """Where images come from; labels are ignored in pretraining."""

    path: Optional[str] = None
    """An ImageFolder directory, a .tar.gz of one, 'cifar10' (torchvision download) or 'synthetic'."""
    split: Optional[str] = None
    """Sub-folder to use (e.g. 'train'); None uses 'train' when present, else the folder itself."""
    batch_size_per_device: int = 64
    """Images per process; the global batch (x processes) sets the learning rate."""
    num_workers: int = 8
    """Data-loading processes per training process."""
    max_images: Optional[int] = None
    """Use a fixed random subset of this many images (smoke runs, tests)."""
    cache_dir: str = "~/.cache/ssl-xcit"
    """Where archives are extracted (once) and cifar10 is downloaded."""
    synthetic_size: int = 2048
    """Number of images of the 'synthetic' source."""
    synthetic_resolution: int = 256
    on_bad_image: Literal["fail", "skip"] = "fail"
    """An image that cannot be decoded: fail stops cleanly before its batch is trained (last.ckpt
    saved, the file named); skip trains on the next readable image instead and lists the file in
    <run.dir>/bad_images.txt. `ssl-xcit check-data PATH` finds such files before a run."""
    max_bad_fraction: float = 0.01
    """With on_bad_image skip: stop (cleanly) once more than this share of the images is unreadable."""


@dataclass
class AugmentConfig:
    """Multi-crop augmentation (DINO, App. B; BYOL-style colour pipeline)."""

    global_crops_size: int = 224
    """Side of the 2 global crops (a multiple of the patch size)."""
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    """Area fraction range of the global crops."""
    local_crops_number: int = 8
    """Local crops per image (only the student sees them)."""
    local_crops_size: int = 96
    """Side of the local crops (a multiple of the patch size)."""
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    """Area fraction range of the local crops."""
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Brightness, contrast, saturation, hue."""
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian-blur sigma range, in pixels of the crop."""
    blur_p_global1: float = 1.0
    """Blur probability of global crop 1 (DINO's asymmetric views: always)."""
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    solarize_p_global2: float = 0.2
    """Solarisation probability of global crop 2 only."""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    """Normalisation mean (ImageNet's; set the dataset's own for others)."""
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    device: Literal["workers", "train"] = "workers"
    """Where colour jitter, grayscale, blur and solarize run: in the data-loader workers, or
    batched on the training device (workers then only decode, crop and flip). Either way the
    workers ship uint8 crops and the training device normalises them."""


@dataclass
class DinoConfig:
    """Loss temperatures and centering."""

    teacher_temp: float = 0.04
    """Teacher softmax temperature after warm-up: lower sharpens (0.07 can be unstable early)."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0; it rises linearly to teacher_temp."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of the linear teacher-temperature warm-up."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the center subtracted from teacher outputs (prevents one-prototype collapse)."""
    koleo_weight: float = 0.0
    """Weight of DINOv2's KoLeo term on the student's global-crop class tokens (0: DINO as published;
    DINOv2 uses 0.1). It spreads the class tokens, which k-NN retrieval rewards."""


@dataclass
class OptimConfig:
    """AdamW with DINO's schedules, all evaluated per optimizer step."""

    lr: float = 0.0005
    """Peak learning rate for a global batch of 256; scaled linearly with the global batch."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine."""
    warmup_epochs: int = 10
    """Epochs of linear lr warm-up from 0."""
    weight_decay: float = 0.04
    """Weight decay at the start; a cosine takes it to weight_decay_end (larger decay late helps ViTs)."""
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    """Teacher EMA momentum at step 0; cosine to 1 at the end."""
    clip_grad: float = 3.0
    """Per-parameter gradient-norm clip (DINO clips each tensor separately); 0 disables."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer gets no update."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    decay_rule: Literal["dino", "xcit"] = "dino"
    """Which tensors weight decay applies to. dino: DINO's rule, every tensor but biases and 1-D ones
    (norm weights); xcit: also not cls_token, the pos_embed projection and XCA's attention temperature
    (the backbone's no_weight_decay() set and a scale that decay would drag to flat attention)."""


@dataclass
class TrainerConfig:
    """What Lightning's Trainer receives."""

    max_epochs: int = 100
    """Epochs of the run; the schedules span them."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run max_epochs). Schedules span the run."""
    accelerator: str = "auto"
    """cpu, gpu or auto."""
    devices: Union[int, str] = "auto"
    """Processes (GPUs) per node."""
    num_nodes: int = 1
    strategy: str = "auto"
    """Lightning strategy; several devices use DDP."""
    precision: Optional[str] = None
    """None: bf16-mixed on GPU, 32-true on CPU."""
    sync_batchnorm: Optional[bool] = None
    """None: SyncBatchNorm when training on several GPUs (XCiT has BatchNorm)."""
    log_every_n_steps: int = 10
    """Log loss, schedules and collapse signals every this many steps."""
    seed: int = 0
    """Seeds the model, the data order and every augmentation."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU; CPU runs resume bit-exactly either way)."""
    enable_progress_bar: bool = True
    logger: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Loggers besides the CSV file that `ssl-xcit report` reads (always written: <run.dir>/logs):
    tensorboard (<run.dir>/tensorboard), wandb (offline, <run.dir>/wandb; `wandb sync` uploads it),
    mlflow (a file store, <run.dir>/mlruns); [] for the CSV alone. wandb and mlflow need
    pip install -e ".[wandb]" / ".[mlflow]"."""


@dataclass
class RunConfig:
    """The run folder: resolved config, checkpoints, logs."""

    dir: Optional[str] = None
    """Default runs/<config-file-name>/."""
    resume: bool = True
    """Continue from <dir>/checkpoints/last.ckpt when it exists; false refuses a used folder."""
    checkpoint_every_n_steps: int = 500
    """Refresh last.ckpt every this many optimizer steps (and at every epoch end)."""
    saveckp_freq: int = 20
    """Keep a periodic checkpoint every this many epochs (0: only last.ckpt)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss stops the run with its step number, or skips that step's update."""
    on_collapse: Literal["warn", "stop"] = "warn"
    """When a collapse signal stays near log K after the warm-ups (teacher entropy: uniform outputs;
    KL of the batch mean to uniform: one prototype wins): a one-line warning with the usual
    remedies, or that warning and a clean stop (last.ckpt saved)."""
    collapse_patience: int = 20
    """Logged steps a collapse signal must stay near log K before the alarm."""
    collapse_margin: float = 0.01
    """'Near log K': within this fraction of log K."""


@dataclass
class MonitorConfig:
    """In-training k-NN monitor of the teacher (off when every_n_epochs is 0 and at_start is not true)."""

    every_n_epochs: int = 0
    """Run the monitor every this many epochs (0: off)."""
    train_path: Optional[str] = None
    """Labelled images whose features form the k-NN bank (folder or .tar.gz)."""
    train_split: Optional[str] = "train"
    holdout_fraction: float = 0.02
    """With val_path and val_split unset, the images to classify are this share of each class of
    train_split (drawn with a fixed seed) and the bank is the rest: the monitor never sees the test
    split, so settings chosen from its figures are not chosen on the test set. Pretraining still
    sees the held-out images, unlabelled (the labels are what the monitor holds out)."""
    val_path: Optional[str] = None
    """Labelled images to classify instead of the holdout (its val or test split unless val_split says)."""
    val_split: Optional[str] = None
    """Split to classify instead of the holdout, e.g. test (of val_path, else of train_path)."""
    max_train_images: Optional[int] = None
    """Cut the bank to a fixed random subset of this many images (after the holdout)."""
    max_val_images: Optional[int] = None
    """Cut the images to classify likewise."""
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    """Data-loading processes of each rank's share of a pass (every rank computes 1/world of the features);
    default: 4, or the machine's cores if fewer."""
    resize: int = 256
    """Evaluation transform: resize the short side, then centre-crop."""
    crop: int = 224
    k: int = 20
    temperature: float = 0.07
    """Vote weight exp(similarity / temperature)."""
    at_start: Optional[bool] = None
    """Also evaluate before the first step (logged at step 0; not on resume). None: when model.init is set."""


@dataclass
class PretrainConfig:
    """Everything ``ssl-xcit pretrain`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
