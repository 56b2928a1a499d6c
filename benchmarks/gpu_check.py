"""The prepared GPU check: one command of a few minutes on one GPU, every figure as JSON.

The device machine has torch, torchvision, timm, Lightning, numpy, pyyaml, safetensors,
tensorboard and matplotlib, but not jsonargparse (and its signature extras), submitit,
faiss or pytest; those travel as wheels in ``.whl/``. The check, in order:

a. installs the wheels into ``--site`` (no index, no dependencies resolved: the list is
   complete) and runs every later part with ``PYTHONPATH=<site>:<repo>``;
b. ``python -m pytest -m gpu``;
c. no host sync in a quiet training step: a real short ``run_pretraining`` of a small XCiT
   with the default config (bf16-mixed), for ``augment.device: workers`` and ``train``, with
   ``torch.cuda.set_sync_debug_mode("error")`` over one step (``on_train_batch_start`` to
   ``on_train_batch_end``) and over a later one from the end of the step before it (its
   batch's fetch, transfer and colour on the device included); pass or the error's text;
   then one ``color_on_device`` call on 128 samples of DINO's crops, timed;
d. XCiT-S12/16 with DINO's crops (2×224 + 10×96, batch 128, bf16-mixed, 65,536
   prototypes, 15 loader workers) on real JPEGs (``train_throughput.py``): the classic PIL
   pipeline eager, ours eager (then a few steps under torch.profiler), ours with regional
   compilation (its cold compile apart from its steady rate), ours with ``augment.device:
   train``; MFU of ``--peak-tflops``;
e. writes ``gpu_check.json`` and ``gpu_check.log`` under ``--out`` (and
   ``profile_gpu.json``) and prints a summary table.

The images are 1,280 Imagenette JPEGs at 224×224 (128 per class, 13 MB; ``--prepare``
makes them): real ImageNet photographs, which CIFAR's 32-px images upsampled sevenfold are
not; their decode is cheaper than full-size ImageNet JPEGs, so the loader's figures are an
upper bound of what full-size images give. Each part runs in its own process with its own
time limit inside ``--budget`` seconds, so one failure or hang costs that part alone.

``--cifar-recipe`` is the follow-up call: ``ssl-xcit pretrain --config configs/gpu_cifar10.yaml``
on the carried CIFAR-10 archive, then the class token's k-NN (torch backend) of the trained
teacher and of random features of the same architecture; JSON, logs, the run's config and
metrics under ``--out``.

    python3 benchmarks/gpu_check.py --prepare                  # here, once: .whl/ and .gpu_data/
    python3 benchmarks/gpu_check.py --out $OUT                 # carry: .whl .gpu_data/imagenette-224-1280
    python3 benchmarks/gpu_check.py --out $OUT --cifar-recipe  # carry: .whl .gpu_data/cifar10-jpeg.tar.gz
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check   # a tiny model, few steps, on this CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
DATA = REPO / ".gpu_data"
IMAGES = DATA / "imagenette-224-1280"
CIFAR = DATA / "cifar10-jpeg.tar.gz"
SHARED = REPO.parent / "shared" / "data"
# what the device machine lacks, with the dependencies it lacks too (pinned as tested here)
WHEELS = ["jsonargparse==4.53.0", "docstring_parser==0.18.0", "typeshed_client==2.15.0", "submitit==1.5.4",
          "cloudpickle==3.1.3", "faiss-cpu==1.15.1", "pytest==9.2.0", "pytest-timeout==2.4.0", "pluggy==1.7.0",
          "iniconfig==2.3.1", "pygments==2.21.0"]
DINO_SMALL = ["--arch", "xcit_small_12_p16_224", "--batch", "128", "--local-crops-number", "10", "--out-dim", "65536",
              "--precision", "bf16-mixed"]
TINY = ["--arch", "xcit_nano_12_p16_224", "--depth", "2", "--batch", "8", "--global-crops-size", "32",
        "--local-crops-size", "16", "--local-crops-number", "2", "--out-dim", "1024", "--head-hidden", "128"]


class Check:
    """The output folder, the log every part appends to, the results and the time left."""

    def __init__(self, out: Path, name: str, budget: float, site: Path, dry_run: bool) -> None:
        self.out, self.name, self.site, self.dry_run = out, name, site, dry_run
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / f"{name}.log"
        self.deadline = time.monotonic() + budget
        self.results: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self) -> dict[str, str]:
        path = [str(self.site), str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
                "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}

    def run(self, name: str, cmd: list[str], limit: float, env: Optional[dict[str, str]] = None,
            keep: int = 20000) -> dict[str, Any]:
        """``cmd`` in a subprocess (the repo as working folder, ``env`` added) within ``limit``
        seconds and the time left; its output's tail goes to the log. Returns rc, seconds and
        the tail."""
        limit = min(limit, self.left())
        if limit < 10:
            return {"status": "skipped: out of time budget", "rc": None}
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=REPO, env={**self.env(), **(env or {})}, capture_output=True, text=True,
                                  timeout=limit)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            rc, output = "timeout", _text(err.stdout) + _text(err.stderr) + f"\n[timed out after {limit:.0f} s]"
        seconds = time.monotonic() - start
        with self.log.open("a") as log:
            log.write(f"\n===== {name} ({seconds:.1f} s, rc {rc}): {' '.join(cmd)}\n{output[-keep:]}\n")
        return {"rc": rc, "seconds": round(seconds, 1), "tail": output[-1500:]}

    def save(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.results, indent=1, default=str))


def _text(stream: Any) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


# -- a. wheels ------------------------------------------------------------------------------
def install_wheels(check: Check) -> dict[str, Any]:
    wheels = sorted(str(w) for w in (REPO / ".whl").glob("*.whl"))
    if not wheels:
        return {"status": "no wheels in .whl/ (carry .whl)"}
    if (check.site / ".installed").exists():
        return {"status": "already installed", "site": str(check.site)}
    r = check.run("install wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                     "--target", str(check.site), *wheels], 120)
    if r["rc"] != 0:  # no pip there: a wheel is a zip of what --target would hold
        for wheel in wheels:
            zipfile.ZipFile(wheel).extractall(check.site)
        r["status"] = "pip failed; the wheels were unzipped into the site folder"
    (check.site / ".installed").write_text("\n".join(wheels))
    return {**r, "wheels": [Path(w).name for w in wheels]}


# -- b. the GPU tests -----------------------------------------------------------------------
def gpu_tests(check: Check) -> dict[str, Any]:
    r = check.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                     "-o", "timeout=150"], 180)
    lines = [ln for ln in r.get("tail", "").splitlines() if ln.strip()]
    return {**r, "summary": lines[-1] if lines else ""}


# -- c. no host sync in a quiet step --------------------------------------------------------
def sync_check(check: Check, images: Path) -> dict[str, Any]:
    """Both augment devices, one after the other in one process (one start-up)."""
    out = check.out / ".sync.json"
    cmd = [sys.executable, str(Path(__file__)), "--part", "sync", "--images", str(images), "--part-json", str(out)]
    r = check.run("sync check", cmd + ["--dry-run"] * check.dry_run, 200)
    results = json.loads(out.read_text()) if out.exists() else {"status": "no result", **r}
    out.unlink(missing_ok=True)
    return results


def sync_windows_run(images: Path, augment_device: str, dry_run: bool) -> dict[str, Any]:
    """The sync check itself (run in its own process): a short real run with two windows of
    sync debug mode "error", on quiet steps (no logging, no checkpoint)."""
    import tempfile

    import pytorch_lightning as pl
    import torch

    from ssl_xcit.pretrain.config import AugmentConfig, DataConfig, ModelConfig, PretrainConfig, TrainerConfig
    from ssl_xcit.pretrain.run import run_pretraining

    cuda = torch.cuda.is_available()
    debug = torch.cuda.set_sync_debug_mode if cuda else (lambda mode: None)

    class SyncWindows(pl.Callback):
        """Batch ``step`` from its on_train_batch_start to its on_train_batch_end ("step"), and
        batch ``step + 3`` from the end of the batch before it ("fetch, transfer and step")."""

        def __init__(self, step: int) -> None:
            self.step, self.open, self.windows = step, None, {}

        def _on(self, name: str) -> None:
            self.open = name
            debug("error")

        def _off(self, outcome: str) -> None:
            debug(0)
            self.windows[self.open], self.open = outcome, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == self.step:
                self._on("step")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if self.open and batch_idx in (self.step, self.step + 3):
                self._off("pass" if cuda else "ran")
            if batch_idx == self.step + 2:
                self._on("fetch, transfer and step")

        def on_exception(self, trainer, module, exception) -> None:
            if self.open:
                self._off(f"fail: {exception}")

    size = dict(global_crops_size=32, local_crops_size=16, local_crops_number=2) if dry_run else {}
    cfg = PretrainConfig(
        model=ModelConfig(arch="xcit_nano_12_p16_224", backbone_kwargs={"depth": 2},
                          out_dim=1024 if dry_run else 65536),
        data=DataConfig(path=str(images), batch_size_per_device=8 if dry_run else 32, num_workers=2 if dry_run else 8),
        augment=AugmentConfig(device=augment_device, **size),
        trainer=TrainerConfig(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed", max_steps=8,
                              log_every_n_steps=10, enable_progress_bar=False),  # no logging step among the 8
    )
    windows = SyncWindows(step=2)
    result: dict[str, Any] = {"checked": cuda, "augment_device": augment_device}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_pretraining(cfg, Path(tmp) / "run", extra_callbacks=[windows])
        except Exception:  # noqa: BLE001  -- the error's text is the finding
            result["error"] = traceback.format_exc()[-4000:]
    result["windows"] = windows.windows
    ok = windows.windows.keys() == {"step", "fetch, transfer and step"} and set(windows.windows.values()) == {"pass"}
    result["status"] = ("pass" if ok else "fail") if cuda else "not checked: no CUDA (the run and its windows ran)"
    return result


# -- d. XCiT-S12/16 with DINO's crops -------------------------------------------------------
def timing(check: Check, images: Path, peak_tflops: float) -> dict[str, Any]:
    n_images = sum(1 for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if check.dry_run:
        model, steps, workers, device = TINY, ["--warmup", "2", "--steps", "3"], "2", "cpu"
    else:
        model, steps, workers, device = DINO_SMALL, ["--warmup", "5", "--steps", "20"], "15", "cuda"
    profile = ["--profile", "2" if check.dry_run else "3", "--profile-json", str(check.out / "profile_gpu.json")]
    batches = int(steps[1]) + int(steps[3]) + 4
    repeat = math.ceil(batches * int(model[model.index("--batch") + 1]) / max(n_images, 1))
    common = [*model, *steps, "--device", device, "--data", str(images), "--repeat", str(repeat), "--workers", workers,
              "--peak-tflops", str(peak_tflops)]
    runs = {  # name: (extra arguments, time limit), the most wanted first: what the budget leaves out is last
        "ours eager": (["--augment-device", "workers", *profile], 120),
        "classic PIL pipeline eager": (["--augment-device", "classic"], 90),
        "ours + regional compile": (["--augment-device", "workers", "--compile", "blocks"], 240),
        "ours, augment.device train, eager": (["--augment-device", "train"], 90),
    }
    cold = {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": f"/tmp/gpu-check-inductor-{time.time()}",
            "TRITON_CACHE_DIR": f"/tmp/gpu-check-triton-{time.time()}"}  # a cold compile, even on a warm machine
    results = {}
    for name, (extra, limit) in runs.items():
        out = check.out / ".timing.json"
        r = check.run(f"timing: {name}", [sys.executable, str(HERE / "train_throughput.py"), *common, *extra,
                                          "--json", str(out)], limit, env=cold)
        results[name] = json.loads(out.read_text()) if out.exists() else {"status": "no result", **r}
        out.unlink(missing_ok=True)
        check.results["timing"] = results
        check.save()  # what is measured is kept even if a later run hangs the machine
    return results


def colour_on_device(check: Check, images: Path) -> dict[str, Any]:
    """One ``color_on_device`` call on a batch of 128 samples of DINO's crops (2×224 + 10×96)."""
    out = check.out / ".colour.json"
    batch, device = ("8", "cpu") if check.dry_run else ("128", "cuda")
    r = check.run("colour on the device", [sys.executable, str(HERE / "device_color_bench.py"), "--images", str(images),
                                           "--batch", batch, "--device", device, "--json", str(out)], 90)
    result = json.loads(out.read_text()) if out.exists() else {"status": "no result", **r}
    out.unlink(missing_ok=True)
    return result


# -- e. summary -----------------------------------------------------------------------------
def summary(results: dict[str, Any]) -> str:
    lines = [f"device: {results.get('device')}  torch {results.get('torch')}"]
    for name in ("install", "gpu_tests"):
        r = results.get(name, {})
        lines.append(f"{name:10s} {r.get('status') or r.get('summary') or ('rc ' + str(r.get('rc')))}")
    for device, r in results.get("sync", {}).items():
        if isinstance(r, dict):
            lines.append(f"sync check, augment.device {device}: {r.get('status')}  {r.get('windows', '')}")
    colour = results.get("colour_on_device", {})
    if "wall_ms_per_call" in colour:
        lines.append(f"color_on_device, {colour['batch']} samples of {colour['crops']} on {colour['device']}: "
                     f"{colour['wall_ms_per_call']['median']:.1f} ms per call (median)")
    rows = results.get("timing", {})
    if rows:
        first = next((r for r in rows.values() if "arch" in r), {})
        model = f"{first.get('arch')}, {first.get('crops')}, batch {first.get('batch')}"
        lines.append(f"{model:38s} {'samples/s':>9s} {'compile s':>9s} "
                     f"{'TFLOP/s':>8s} {'MFU':>6s} {'GPU GiB':>8s} {'RSS GiB':>8s}")
        for name, r in rows.items():
            if "samples_per_s" not in r:
                lines.append(f"{name:38s} {r.get('status')} rc {r.get('rc')}")
                continue
            compiled = r["compile"] != "off"
            lines.append(f"{name:38s} {r['samples_per_s']:9.1f} "
                         f"{(r['first_steps_beyond_steady_s'] if compiled else 0):9.1f} {r['achieved_tflops']:8.1f} "
                         f"{(r['mfu'] or 0):6.1%} {(r['peak_gpu_memory_gib'] or 0):8.1f} {r['rss_max_gib']:8.2f}")
    return "\n".join(lines)


# -- the follow-up call: the GPU CIFAR-10 recipe --------------------------------------------
EVAL_RESERVE_S = 110  # the two k-NN evaluations and the report, kept out of the training's time


def cifar_recipe(check: Check, config: Path) -> dict[str, Any]:
    """The recipe as written but for its length: a 40-step probe measures this GPU's seconds per
    step (and extracts the archive), the run gets the whole epochs that fit the time left, and a
    USR2 before the limit stops it cleanly with its checkpoint (the schedules then end short)."""
    if not config.exists():
        return {"status": f"{config} does not exist yet: nothing run"}
    if not CIFAR.exists():
        return {"status": f"{CIFAR.relative_to(REPO)} missing: carry it"}
    stamp, cache = int(time.time()), Path("/tmp/gpu-check-cache")
    cli = [sys.executable, "-m", "ssl_xcit.cli"]
    common = [*cli, "pretrain", "--config", str(config), "--run.resume", "false", "--data.path", str(CIFAR),
              "--data.cache_dir", str(cache), "--monitor.train_path", str(CIFAR), "--trainer.enable_progress_bar",
              "false"]
    tiny = ["--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2"] if check.dry_run else []
    probe_dir = Path(f"/tmp/gpu-cifar-probe-{stamp}")
    probe_steps = 6 if check.dry_run else 40
    result: dict[str, Any] = {"probe": check.run("probe", [*common, *tiny, "--run.dir", str(probe_dir),
                                                            "--trainer.max_steps", str(probe_steps),
                                                            "--trainer.log_every_n_steps", "5" if not tiny else "2",
                                                            "--monitor.every_n_epochs", "0"], 150)}
    per_step = _seconds_per_step(probe_dir)
    import yaml

    resolved = yaml.safe_load((probe_dir / "config.yaml").read_text()) if (probe_dir / "config.yaml").exists() else None
    if per_step is None or resolved is None:
        return {**result, "status": "the probe logged no steps"}
    steps_per_epoch = (resolved["data"]["max_images"] or 50000) // resolved["data"]["batch_size_per_device"]
    train_s = check.left() - EVAL_RESERVE_S - 45  # 45 s: the run's start-up and monitor passes
    epochs = max(2, min(int(train_s / (per_step * steps_per_epoch)), resolved["trainer"]["max_epochs"]))
    result.update(seconds_per_step=round(per_step, 4), steps_per_epoch=steps_per_epoch, epochs=epochs,
                  recipe_epochs=resolved["trainer"]["max_epochs"])
    run_dir = Path(f"/tmp/gpu-cifar-run-{stamp}")
    limit = max(30, check.left() - EVAL_RESERVE_S)
    guard = ["timeout", "--signal", "USR2", "--kill-after", "40", str(int(limit) - 40)]
    result["pretrain"] = check.run("pretrain", [*guard, *common, *tiny, "--run.dir", str(run_dir),
                                                "--trainer.max_epochs", str(epochs), "--monitor.every_n_epochs",
                                                str(max(1, epochs // 4))], limit)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return {**result, "status": "pretraining wrote no checkpoint"}
    m, a = resolved["model"], resolved["augment"]
    protocol = ["--train_data", str(CIFAR), "--train_split", "train", "--test_split", "test", "--backend", "torch",
                "--resize", str(a["global_crops_size"]), "--crop", str(a["global_crops_size"]),
                "--mean", json.dumps(list(a["mean"])), "--std", json.dumps(list(a["std"])), "--cache_dir", str(cache),
                "--features_dir", "/tmp/gpu-check-features", "--progress", "false"]
    protocol += (["--num_workers", "2", "--max_train_images", "1000", "--max_test_images", "500"] if check.dry_run
                 else ["--num_workers", "15"])
    backbones = {"trained": ["--checkpoint", str(last)],
                 "random": ["--checkpoint", "random", "--arch", m["arch"],
                            "--backbone_kwargs", json.dumps(m.get("backbone_kwargs") or {})]}
    for name, which in backbones.items():
        out = check.out / f"knn_{name}.json"
        result[f"knn_{name}"] = check.run(f"knn {name}", [*cli, "knn", *which, *protocol, "--out", str(out)], 50)
        if out.exists():
            result[f"knn_{name}"]["report"] = json.loads(out.read_text())
    result["report"] = check.run("report", [*cli, "report", str(run_dir), "--out", str(check.out / "gpu_cifar10_report.png")],
                                 30)
    for f in [run_dir / "config.yaml", *sorted(run_dir.rglob("metrics.csv"))[-1:]]:
        if f.exists():
            (check.out / f.name).write_bytes(f.read_bytes())
    return result


def _seconds_per_step(run_dir: Path) -> Optional[float]:
    """Seconds per optimizer step after the first logged one, from the run's TensorBoard event times."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        walls = {e.step: e.wall_time for e in events.Scalars("train/loss")}
    except Exception:  # noqa: BLE001 - no events: the caller reports it
        return None
    if len(walls) < 2:
        return None
    first, last = min(walls), max(walls)
    return (walls[last] - walls[first]) / (last - first)


def cifar_summary(results: dict[str, Any]) -> str:
    r = results.get("cifar_recipe", {})
    lines = [f"device: {results.get('device')}  torch {results.get('torch')}",
             f"pretrain: {r.get('status') or ('rc ' + str(r.get('pretrain', {}).get('rc')))} "
             f"in {r.get('pretrain', {}).get('seconds')} s"]
    if "epochs" in r:
        lines.append(f"{r['epochs']} epochs of {r['steps_per_epoch']} steps at {r['seconds_per_step']} s/step "
                     f"(probe; the recipe says {r['recipe_epochs']})")
    lines += _curve_ends(results)
    for name in ("trained", "random"):
        report = r.get(f"knn_{name}", {}).get("report")
        top1 = {row["k"]: round(row["top1"], 2) for row in report["results"]} if report else None
        lines.append(f"k-NN top-1 % by k, {name} class token: "
                     + (str(top1) if top1 else f"no report (rc {r.get(f'knn_{name}', {}).get('rc')})"))
    return "\n".join(lines)


def _curve_ends(results: dict[str, Any]) -> list[str]:
    """The last logged loss and teacher entropy against log K, from the copied metrics.csv."""
    import csv

    path = Path(results.get("out", "")) / "metrics.csv"
    if not path.exists():
        return []
    rows = [r for r in csv.DictReader(path.open()) if r.get("train/loss")]
    if not rows:
        return []
    last = rows[-1]
    return [f"step {last['step']}: loss {float(last['train/loss']):.3f}, teacher entropy "
            f"{float(last['collapse/teacher_entropy']):.3f}, KL(mean || uniform) {float(last['collapse/kl_to_uniform']):.3f}"]


# -- here, once: the wheels and the data the device machine gets ----------------------------
def prepare() -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(REPO / ".whl"), *WHEELS],
                   check=True)
    if not IMAGES.exists():
        _imagenette_subset(SHARED / "imagenette2-224.tar.gz", IMAGES, per_class=128)
    if not CIFAR.exists():
        CIFAR.write_bytes((SHARED / "cifar10-jpeg.tar.gz").read_bytes())
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
             for p in [REPO / ".whl", IMAGES, CIFAR]}
    print({k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()})


def _imagenette_subset(archive: Path, dest: Path, per_class: int) -> None:
    """The first ``per_class`` training JPEGs of each class (by name), unchanged."""
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/train/" in m.name), key=lambda m: m.name)
        for m in members:
            wnid = m.name.split("/")[-2]
            if taken.get(wnid, 0) < per_class:
                taken[wnid] = taken.get(wnid, 0) + 1
                target = dest / "train" / wnid / Path(m.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())


def device_facts(check: Check) -> None:
    r = check.run("device", [sys.executable, "-c", "import torch; print(torch.__version__); print(torch.cuda."
                             "get_device_name() if torch.cuda.is_available() else 'no CUDA device')"], 60)
    lines = r.get("tail", "").strip().splitlines()[-2:]
    check.results["torch"], check.results["device"] = lines if len(lines) == 2 else ("?", "?")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    p.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
    p.add_argument("--images", type=Path, default=IMAGES)
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check, default 350 (320 with "
                   "--cifar-recipe); each part has its own limit within it, what does not fit is skipped and said so")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument("--dry-run", action="store_true", help="a tiny model, a few steps, on the CPU")
    p.add_argument("--cifar-recipe", action="store_true", help="the follow-up call: the GPU CIFAR-10 recipe")
    p.add_argument("--recipe", type=Path, default=REPO / "configs" / "gpu_cifar10.yaml", help="its config")
    p.add_argument("--prepare", action="store_true", help="here: download the wheels, make .gpu_data/")
    p.add_argument("--part", choices=["sync"], help=argparse.SUPPRESS)  # a part in its own process
    p.add_argument("--part-json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.part == "sync":
        results = {}
        for device in ("workers", "train"):
            results[device] = sync_windows_run(args.images, device, args.dry_run)
            args.part_json.write_text(json.dumps(results))  # what is known, should the next one hang
        return None
    budget = args.budget or (320 if args.cifar_recipe else 350)
    check = Check(args.out, "cifar_recipe" if args.cifar_recipe else "gpu_check", budget, args.site, args.dry_run)
    check.results["out"] = str(args.out)
    check.results["install"] = install_wheels(check)
    device_facts(check)
    if args.cifar_recipe:
        check.results["cifar_recipe"] = cifar_recipe(check, args.recipe)
        check.save()
        print(cifar_summary(check.results))
        return None
    check.results["gpu_tests"] = gpu_tests(check)
    check.save()
    check.results["sync"] = sync_check(check, args.images)
    check.save()
    check.results["colour_on_device"] = colour_on_device(check, args.images)
    check.save()
    timing(check, args.images, args.peak_tflops)
    check.save()
    print(summary(check.results))
    profile = check.out / "profile_gpu.json"
    if profile.exists():
        from op_families import format_table

        report = json.loads(profile.read_text())
        print(f"\nours eager, self time per op family ({report['profile']['steps']} steps, {report['device']}):\n"
              + format_table(report["profile"]["families"], device="CPU" not in report["device"]))


if __name__ == "__main__":
    main()
