"""Training throughput of DINO pretraining: samples/s, FLOPs, MFU, memory, and where the time goes.

Runs the real LightningModule under a real Trainer. By default the crops are random uint8
tensors made once, so the figure is the model's (teacher forward, student forward and
backward, AdamW, EMA, and the crops' normalisation on the device); ``--data PATH`` feeds it
real images through the full multi-crop pipeline instead (``--data synthetic`` for generated
ones), with ``--augment-device workers|train``, or through the classic PIL pipeline
(``classic``) as the reference.

A step's FLOPs are counted once on the meta device (shapes only: no memory, no time):
teacher forward on the 2 global crops, student forward and backward on all of them (the
loss and the optimizer are not counted). ``--warmup`` untimed steps come first, and their
seconds are reported apart: with ``--compile`` they hold the compilation. Over the timed steps
the wall clock gives samples/s and the process's CPU time (all its threads, not the loader
workers') its CPU cost per sample, which other processes on a shared CPU disturb less; a
thread samples the resident memory of this process and of its loader workers.
``--profile N`` then runs N more steps under torch.profiler and prints their self time per
op family (``op_families.py``), also written as JSON.

    python benchmarks/train_throughput.py --arch xcit_nano_12_p16_224 --batch 16 --device cpu
    python benchmarks/train_throughput.py --arch xcit_nano_12_p8_224 --depth 6 --global-crops-size 64 \\
        --local-crops-number 0 --out-dim 1024 --head-hidden 512 --batch 64 --precision bf16-mixed --profile 5
    python benchmarks/train_throughput.py ... --data /tmp/imagenette2-224 --augment-device classic   # the reference
    python benchmarks/train_throughput.py --arch xcit_small_12_p16_224 --batch 128 --local-crops-number 10 \\
        --device cuda --peak-tflops 989 --data DIR --repeat 3 --workers 15 --compile blocks --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode

from op_families import format_table, grouped_self_times
from ssl_xcit.pretrain.config import AugmentConfig, DataConfig, ModelConfig, PretrainConfig, TrainerConfig
from ssl_xcit.pretrain.data import PretrainDataModule
from ssl_xcit.pretrain.module import DINOModule, build_student

PAGE = os.sysconf("SC_PAGE_SIZE")


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
    """The images of a folder (searched recursively, ``repeat`` times over) through the classic
    PIL multi-crop pipeline."""

    def __init__(self, folder: str, transform, repeat: int) -> None:
        paths = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not paths:
            raise SystemExit(f"--data {folder}: no JPEG or PNG images (the classic pipeline reads an image folder)")
        self.paths, self.transform = paths * repeat, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {"crops": self.transform(self.paths[index]), "bad": ""}


class RepeatedImages(PretrainDataModule):
    """The data module with its images seen ``repeat`` times an epoch, so that a small folder
    fills the timed steps without an epoch boundary (whose loader restart would be timed)."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, repeat: int) -> None:
        super().__init__(data, augment)
        self.repeat = repeat

    def setup(self, stage: str) -> None:
        fresh = self.dataset is None
        super().setup(stage)
        if fresh and self.repeat > 1:
            n = len(self.dataset.source)
            self.dataset.source = Subset(self.dataset.source, list(range(n)) * self.repeat)


def resident_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def children_resident_bytes() -> int:
    """Resident memory of this process's children (the loader workers); 0 where /proc cannot say."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            for pid in (task / "children").read_text().split():
                total += resident_bytes(pid)
    return total


class RssSampler:
    """The largest resident memory of this process, and of its children together, sampled
    every ``period`` seconds by a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.peak, self.children_peak = period, 0, 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        self.peak = max(self.peak, resident_bytes())
        self.children_peak = max(self.children_peak, children_resident_bytes())

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Wall clock at the first batch, after the warm-up steps and after the timed steps (the
    device synchronised there only); the memory samplers run over the timed steps."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.first = self.first_step_end = self.timed_start = self.timed_end = 0.0
        self.cpu_start = self.cpu_end = 0.0  # this process's CPU seconds, all its threads
        self.rss = RssSampler()
        self.peak_gpu = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if not self.first:
            _sync()
            self.first = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in (1, self.warmup, self.warmup + self.steps):
            _sync()
        if step == 1:
            self.first_step_end = time.perf_counter()
        if step == self.warmup:
            self.timed_start, self.cpu_start = time.perf_counter(), time.process_time()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.rss.start()
        if step == self.warmup + self.steps:
            self.timed_end, self.cpu_end = time.perf_counter(), time.process_time()
            self.rss.stop()
            self.peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


class ProfileSteps(pl.Callback):
    """torch.profiler over ``n`` steps after ``after`` steps, each with its batch's fetch and
    transfer (from the end of one step to the end of the next)."""

    def __init__(self, after: int, n: int) -> None:
        self.after, self.n = after, n
        self.profiler: Optional[torch.profiler.profile] = None
        self.families: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.after:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            _sync()
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif self.profiler is not None and trainer.global_step == self.after + self.n:
            _sync()
            self.profiler.__exit__(None, None, None)
            self.families = grouped_self_times(self.profiler.key_averages(), self.n)
            self.profiler = None


@contextlib.contextmanager
def _autocast_accepts_meta() -> Iterator[None]:
    """The head turns autocast off around its last layer with ``torch.autocast(x.device.type)``,
    which refuses 'meta'; nothing autocasts on meta tensors, so 'cpu' stands in while counting."""
    real = torch.autocast

    class MetaAutocast(real):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = MetaAutocast
    try:
        yield
    finally:
        torch.autocast = real


def step_flops(cfg: PretrainConfig, batch: int) -> int:
    """FLOPs of one training step (matmuls, convolutions, attention), counted on meta tensors:
    teacher forward on the 2 global crops, student forward and backward on every crop."""
    a = cfg.augment
    with torch.device("meta"):
        student, teacher = build_student(cfg, cfg.model.drop_path_rate), build_student(cfg, 0.0)
        crops = [torch.empty(batch, 3, s, s) for s in [a.global_crops_size] * 2 + [a.local_crops_size] * a.local_crops_number]
    teacher.requires_grad_(False)
    with _autocast_accepts_meta(), FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher(crops[:2])
        student(crops).float().sum().backward()
    return counter.get_total_flops()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
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
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compilation happens there)")
    p.add_argument("--data", default=None, help="an image folder or .tar.gz (or 'synthetic') through the full "
                   "augmentation; default: fixed uint8 crops, the model and the normalisation alone")
    p.add_argument("--repeat", type=int, default=1, help="see --data's images this many times an epoch (a small "
                   "folder then fills the timed steps without an epoch boundary)")
    p.add_argument("--augment-device", default="workers", choices=["workers", "train", "classic"],
                   help="classic: the classic PIL pipeline with DINO's parameters (augment_bench.py), in the "
                        "workers, as the reference; --data must then be an image folder")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads in the training process (default: "
                   "torch's); one thread keeps a shared CPU's other work from stalling parallel kernels")
    p.add_argument("--channels-last", action="store_true", help="model.channels_last: true")
    p.add_argument("--compile", default="off", choices=["off", "blocks", "backbone"],
                   help="blocks: model.compile (each transformer block, ssl_xcit.backbones.compile_blocks); "
                        "backbone: the whole backbone compiled as one graph per crop size")
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--depth", type=int, default=None, help="backbone depth override (backbone_kwargs depth)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense TFLOP/s, for MFU")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="then N steps under torch.profiler: self "
                   "time per op family, printed and written to --profile-json")
    p.add_argument("--profile-json", default="train_profile.json")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(arch=args.arch, out_dim=args.out_dim, head_hidden_dim=args.head_hidden,
                          backbone_kwargs={} if args.depth is None else {"depth": args.depth},
                          channels_last=args.channels_last, compile=args.compile == "blocks"),
        data=DataConfig(path=args.data or "synthetic", batch_size_per_device=args.batch, num_workers=args.workers,
                        synthetic_size=args.batch * (args.steps + args.warmup + args.profile + 1)),
        augment=AugmentConfig(global_crops_size=args.global_crops_size, local_crops_size=args.local_crops_size,
                              local_crops_number=args.local_crops_number,
                              device="workers" if args.augment_device == "classic" else args.augment_device),
        trainer=TrainerConfig(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision),
    )


def fit(args: argparse.Namespace, cfg: PretrainConfig, module: DINOModule, trainer: pl.Trainer) -> None:
    on_gpu = args.device == "cuda"
    if args.augment_device == "classic":
        from augment_bench import ClassicDINO  # a sibling script: only this mode needs it

        data = ClassicCrops(args.data, ClassicDINO(cfg.augment), args.repeat)
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                                                         num_workers=args.workers, pin_memory=on_gpu,
                                                         persistent_workers=args.workers > 0))
    elif args.data:
        trainer.fit(module, datamodule=RepeatedImages(cfg.data, cfg.augment, args.repeat))
    else:
        data = FixedCrops(args.batch * (args.steps + args.warmup + args.profile + 1), args.global_crops_size,
                          args.local_crops_size, args.local_crops_number)
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, drop_last=True,
                                                         num_workers=2 if on_gpu else 0,  # collate beside the GPU
                                                         persistent_workers=on_gpu, pin_memory=on_gpu))


def device_name(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def report(args: argparse.Namespace, flops: int, timer: StepTimer, precision: str) -> dict[str, Any]:
    seconds = timer.timed_end - timer.timed_start
    step_s = seconds / args.steps
    warmup_s = timer.timed_start - timer.first
    achieved = flops / step_s / 1e12
    return {
        "arch": args.arch, "depth": args.depth, "compile": args.compile, "channels_last": args.channels_last,
        "crops": f"2x{args.global_crops_size}+{args.local_crops_number}x{args.local_crops_size}",
        "batch": args.batch, "out_dim": args.out_dim, "precision": precision, "device": device_name(args),
        "torch": torch.__version__, "data": args.data or "fixed uint8 crops",
        "augment_device": args.augment_device if args.data else None, "workers": args.workers,
        "samples_per_s": args.batch / step_s, "step_s": step_s, "timed_steps": args.steps,
        "process_cpu_s_per_sample": (timer.cpu_end - timer.cpu_start) / args.steps / args.batch,
        "first_step_s": timer.first_step_end - timer.first, "warmup_steps": args.warmup, "warmup_s": warmup_s,
        "first_steps_beyond_steady_s": warmup_s - args.warmup * step_s,
        "step_tflop": flops / 1e12, "gflop_per_image": flops / args.batch / 1e9, "achieved_tflops": achieved,
        "peak_tflops": args.peak_tflops, "mfu": achieved / args.peak_tflops if args.peak_tflops else None,
        "peak_gpu_memory_gib": timer.peak_gpu / 2**30 if args.device == "cuda" else None,
        "rss_max_gib": timer.rss.peak / 2**30, "workers_rss_max_gib": timer.rss.children_peak / 2**30,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def print_report(r: dict[str, Any]) -> None:
    layout = " channels_last" * r["channels_last"] + f" compile={r['compile']}" * (r["compile"] != "off")
    data = r["data"] + (f" augmented on {r['augment_device']}" if r["augment_device"] else "")
    print(f"arch {r['arch']}{layout}  crops {r['crops']}  batch {r['batch']}  precision {r['precision']}  "
          f"device {r['device']}  data {data}")
    print(f"samples/s          {r['samples_per_s']:10.2f}   ({r['timed_steps']} steps of {r['step_s']:.3f} s; "
          f"{r['process_cpu_s_per_sample'] * 1e3:.1f} ms of this process's CPU time per sample)")
    print(f"first steps        {r['warmup_s']:10.2f} s ({r['warmup_steps']} steps; {r['first_steps_beyond_steady_s']:.1f} s "
          f"beyond steady steps; the first {r['first_step_s']:.1f} s)")
    print(f"step FLOPs         {r['step_tflop']:10.3f} TFLOP  ({r['gflop_per_image']:.1f} GFLOP per image)")
    print(f"achieved           {r['achieved_tflops']:10.3f} TFLOP/s")
    if r["mfu"] is not None:
        print(f"MFU                {r['mfu']:10.1%}   (of {r['peak_tflops']} TFLOP/s peak)")
    if r["peak_gpu_memory_gib"] is not None:
        print(f"peak GPU memory    {r['peak_gpu_memory_gib']:10.2f} GiB (timed steps)")
    print(f"host RSS, max      {r['rss_max_gib']:10.2f} GiB during the timed steps (loader workers together: "
          f"{r['workers_rss_max_gib']:.2f} GiB); process peak {r['ru_maxrss_gib']:.2f} GiB")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)
    flops = step_flops(cfg, args.batch)
    module = DINOModule(cfg)
    if args.compile == "backbone":  # in place, as model.compile does for blocks
        module.student.backbone.compile(dynamic=False)
        module.teacher.backbone.compile(dynamic=False)
    on_gpu = args.device == "cuda"
    precision = args.precision or ("bf16-mixed" if on_gpu else "32-true")
    timer, profiled = StepTimer(args.warmup, args.steps), ProfileSteps(args.warmup + args.steps, args.profile)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=precision,
                         max_steps=args.warmup + args.steps + args.profile, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer, profiled] if args.profile else [timer],
                         log_every_n_steps=cfg.trainer.log_every_n_steps,
                         benchmark=True if on_gpu else None)  # as the run's Trainer: fixed crop sizes
    fit(args, cfg, module, trainer)
    result = report(args, flops, timer, precision)
    print_report(result)
    if args.profile:
        print(f"\nself time per op family over {args.profile} steps (torch.profiler):\n"
              + format_table(profiled.families, on_gpu))
        result["profile"] = {"steps": args.profile, "families": profiled.families}
        Path(args.profile_json).write_text(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
