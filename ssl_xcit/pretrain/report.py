"""``ssl-xcit report RUN_DIR``: a run's training curves as one picture (or a small HTML page).

Reads every ``logs/version_*/metrics.csv`` of the run folder (one per (re)start; a later
segment wins where two logged the same step) and ``config.yaml`` (for K, the number of
prototypes). Whatever was logged is drawn; a run that has logged nothing yet (fewer steps
than ``trainer.log_every_n_steps``) is said so in one line. Panels: the loss; the k-NN
monitor with the random-init floor (and RankMe);
the teacher's entropy and the KL of its batch mean to uniform, both against log K (either
reaching log K is a collapse); lr and weight decay; teacher momentum and temperature; the
center's norm.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ssl_xcit.errors import UserError
from ssl_xcit.files import atomic_write, atomic_write_text
from ssl_xcit.options import parse_options
from ssl_xcit.plotting import pyplot
from ssl_xcit.pretrain.config import TrainerConfig

Curves = dict[str, dict[int, float]]


@dataclass
class ReportOptions:
    """Which run and where its picture goes."""

    run_dir: Optional[str] = None
    """The run folder (also given as the first argument)."""
    out: Optional[str] = None
    """report.png, or a .html page holding the picture and the last values; default <run_dir>/report.png."""


def _version(path: Path) -> int:
    return int(path.parent.name.rsplit("_", 1)[-1])


def read_curves(run_dir: Path) -> Curves:
    """metric → {step: value} over every log segment of the run, later segments winning
    (empty when nothing was logged yet)."""
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=_version)
    curves: Curves = {}
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row.pop("step"))
                for key, value in row.items():
                    if value not in ("", None) and key != "epoch":
                        curves.setdefault(key, {})[step] = float(value)
    return curves


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config.yaml as a dict (empty without one)."""
    config = run_dir / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


def prototypes(run_dir: Path) -> Optional[int]:
    """K, from the run's config.yaml, if there is one."""
    return run_config(run_dir).get("model", {}).get("out_dim")


def check_run_folder(run_dir: Path) -> None:
    """Raises UserError, naming what is missing, when ``run_dir`` is no ssl-xcit run folder
    (``ssl-xcit pretrain`` writes config.yaml, then logs/ when training starts)."""
    if not run_dir.is_dir():
        raise UserError(f"run_dir: {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "logs").is_dir():
        raise UserError(f"run_dir: {run_dir} is not an ssl-xcit run folder: it has neither config.yaml nor logs/")


def nothing_logged(run_dir: Path) -> str:
    """Why a run folder holds no logged value yet, in one line: Lightning writes the loggers
    every ``trainer.log_every_n_steps`` optimizer steps, and the run has made fewer."""
    every = run_config(run_dir).get("trainer", {}).get("log_every_n_steps", TrainerConfig.log_every_n_steps)
    last = run_dir / "checkpoints" / "last.ckpt"
    done = "has saved no checkpoint yet"
    if last.is_file():
        import torch

        step = torch.load(last, map_location="cpu", mmap=True, weights_only=True)["global_step"]
        done = f"its last checkpoint is at step {step}"
    return (f"run_dir: nothing logged yet in {run_dir}: the run writes its curves every {every} optimizer steps "
            f"(trainer.log_every_n_steps in its config.yaml) and {done}")


def _plot(ax: Any, curves: Curves, key: str, label: Optional[str] = None, **style: Any) -> bool:
    points = sorted(curves.get(key, {}).items())
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], label=label or key, **style)
    return bool(points)


def _matching(curves: Curves, pattern: str) -> list[str]:
    return sorted(k for k in curves if re.fullmatch(pattern, k))


def _twin(ax: Any, curves: Curves, left: str, right: str, title: str) -> None:
    _plot(ax, curves, left, color="tab:blue")
    ax.set_ylabel(left.split("/")[-1], color="tab:blue")
    other = ax.twinx()
    _plot(other, curves, right, color="tab:orange")
    other.set_ylabel(right.split("/")[-1], color="tab:orange")
    ax.set_title(title)


def draw_report(curves: Curves, k: Optional[int], title: str) -> Any:
    """The six panels as a matplotlib figure (the last one also holds the gradient norms, when logged)."""
    plt = pyplot("ssl-xcit report")
    log_k = math.log(k) if k else None
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (loss, knn, collapse), (lr, teacher, center) = axes

    _plot(loss, curves, "train/loss", "loss")
    loss.set_title("DINO loss")

    for key in _matching(curves, r"knn/top1_k\d+"):
        _plot(knn, curves, key, f"teacher {key.split('/')[-1]}", marker="o")
    for key in _matching(curves, r"knn/random_top1_k\d+"):
        knn.axhline(next(iter(curves[key].values())), color="grey", linestyle="--",
                    label=f"random-init features {key.rsplit('_', 1)[-1]}")
    knn.set_title("k-NN top-1 (%)")
    if not _matching(curves, r"knn/.*"):
        knn.text(0.5, 0.5, "no k-NN monitor in this run\n(monitor.every_n_epochs)", ha="center", va="center",
                 transform=knn.transAxes, color="grey")
    if "knn/rankme" in curves:
        rank = knn.twinx()
        _plot(rank, curves, "knn/rankme", "RankMe", color="tab:green", linestyle=":", marker=".")
        rank.set_ylabel("RankMe (effective rank)", color="tab:green")

    _plot(collapse, curves, "collapse/teacher_entropy", "teacher entropy (→ log K: uniform outputs)")
    _plot(collapse, curves, "collapse/kl_to_uniform", "KL(batch mean ‖ uniform) (→ log K: one prototype)")
    if log_k:
        collapse.axhline(log_k, color="red", linestyle="--", label=f"log K = {log_k:.2f}")
        loss.axhline(log_k, color="red", linestyle="--", label=f"log K = {log_k:.2f}")
    collapse.set_title("collapse signals (nats)")

    _twin(lr, curves, "schedule/lr", "schedule/weight_decay", "learning rate and weight decay")
    _twin(teacher, curves, "schedule/momentum_teacher", "schedule/teacher_temp", "teacher momentum and temperature")
    _plot(center, curves, "collapse/center_norm", "center norm", color="tab:blue")
    center.set_ylabel("center norm", color="tab:blue")
    grads = center.twinx()
    drawn = _plot(grads, curves, "train/grad_norm", "gradient norm (total, before clipping)", color="tab:orange")
    drawn |= _plot(grads, curves, "train/grad_norm_max", "largest tensor's gradient norm", color="tab:orange",
                   linestyle=":")
    if drawn:
        grads.set_ylabel("gradient norm", color="tab:orange")
        grads.legend(fontsize=8, loc="upper right")
    center.set_title("center norm and gradient norm")

    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def last_values(curves: Curves) -> list[tuple[str, int, float]]:
    """(metric, step, value) of each metric's last logged point."""
    return [(key, *max(points.items())) for key, points in sorted(curves.items()) if points]


def html_page(png: bytes, curves: Curves, title: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{s}</td><td>{v:.6g}</td></tr>" for k, s, v in last_values(curves))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>"
            f"<img alt='training curves' style='max-width:100%' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<h3>last values</h3><table border='1' cellpadding='4' style='border-collapse:collapse'>"
            f"<tr><th>metric</th><th>step</th><th>value</th></tr>{rows}</table></body></html>\n")


def write_report(run_dir: Path, out: Path) -> Path:
    check_run_folder(run_dir)
    curves = read_curves(run_dir)
    if not curves:
        raise UserError(nothing_logged(run_dir))
    fig = draw_report(curves, prototypes(run_dir), f"ssl-xcit run {run_dir}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    pyplot("ssl-xcit report").close(fig)
    if out.suffix.lower() == ".html":
        return atomic_write_text(out, html_page(buffer.getvalue(), curves, f"ssl-xcit run {run_dir}"))
    return atomic_write(out, lambda f: f.write(buffer.getvalue()))


def report_command(argv: Sequence[str]) -> int:
    argv = ["--run_dir", *argv] if argv and not argv[0].startswith("-") else list(argv)
    opts = parse_options(ReportOptions, argv, "ssl-xcit report", __doc__.splitlines()[0]).options
    if not opts.run_dir:
        raise UserError("report needs the run folder: ssl-xcit report RUN_DIR [--out report.png|report.html]")
    run_dir = Path(opts.run_dir)
    out = Path(opts.out) if opts.out else run_dir / "report.png"
    if out.suffix.lower() not in (".png", ".html"):
        raise UserError(f"--out: {out} must end in .png or .html")
    print(write_report(run_dir, out))
    return 0
