"""The stop controller across 2 CPU processes (gloo): a NaN on one rank stops both at the same step
without a hang and without saving; ``skip`` skips the same steps on both; a step that logs nothing
makes no collective of its own and reads nothing back; a resume onto another number of processes
continues exactly in samples, or is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_pretrain_args

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow
# 64 synthetic images, 4 per process x 2 processes: 8 steps an epoch; decisions every 4 steps
BASE = dict(data__synthetic_size="64", data__synthetic_resolution="40", data__batch_size_per_device="4",
            trainer__max_epochs="2", trainer__log_every_n_steps="4", trainer__accelerator="cpu",
            run__checkpoint_every_n_steps="4", run__saveckp_freq="0")


def probe(out: Path, run_dir: Path, *probe_args: str, processes: int = 2, **overrides: str) -> list[dict]:
    """Run the probe (``processes`` processes) and return each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {**BASE, **overrides}
    if processes > 1:
        settings.update(trainer__devices=str(processes), trainer__strategy="ddp")
    args = tiny_pretrain_args("synthetic", run_dir, **settings)
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    proc = subprocess.run([sys.executable, str(HERE / "stop_probe.py"), str(out), *probe_args, "--", *args], env=env,
                          capture_output=True, text=True, timeout=600)  # a hang fails here instead of blocking
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def test_a_nan_on_one_rank_stops_both_at_the_same_step_without_saving_it(tmp_path):
    """NaN on rank 1 at step 5: both ranks stop at the next decision point (step 8), name rank 1 and
    step 5, and last.ckpt stays the one of step 4."""
    ranks = probe(tmp_path / "out", tmp_path / "run", "--nan", "1:5")
    for record in ranks:
        assert record["ended"].startswith("FloatingPointError: non-finite loss nan at step 5 (noted on rank 1)")
        assert record["decision"]["step"] == 5 and record["decision"]["rank"] == 1
        assert [s["step"] for s in record["steps"]][-1] == 7  # the 8th step, within one decision interval
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_skip_skips_the_same_steps_on_both_ranks_and_the_center_stays_finite(tmp_path):
    ranks = probe(tmp_path / "out", tmp_path / "run", "--nan", "1:5", run__on_nonfinite="skip")
    for record in ranks:
        assert record["ended"] == "finished"
        assert [s["step"] for s in record["steps"] if s["skipped"]] == [5]
        assert all(s["center_finite"] for s in record["steps"])
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 16
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())


def test_a_step_that_logs_nothing_makes_no_collective_of_its_own_and_reads_nothing_back(tmp_path):
    """Counted per step, from the first callback's batch start to the progress bar's batch end
    (default config but the tiny model; the progress bar on). On the steps that neither log nor
    decide, the one collective is the center's all-reduce of the (1, K) teacher mean, which
    DINO's maths needs; no tensor is read back by the host."""
    ranks = probe(tmp_path / "out", tmp_path / "run", "--count-syncs", trainer__enable_progress_bar="true")
    for record in ranks:
        quiet = {step: seen["events"] for step, seen in record["syncs"].items()
                 if not seen["logs"] and (step + 1) % 4 and (step + 1) % 8}
        assert quiet, "some steps neither log nor decide"
        for step, events in quiet.items():
            reads = [e for e in events if e[0] == "read"]
            collectives = [(name, shape) for kind, name, shape, _ in events if kind == "collective"]
            assert not reads, f"step {step} read the device back:\n{reads[0][3]}"
            assert collectives == [("all_reduce", (1, 256))], f"step {step}: {collectives}"
        logging = [seen["events"] for seen in record["syncs"].values() if seen["logs"]]
        assert any(e[0] == "read" for events in logging for e in events), "the counter counts nothing"


def test_resume_onto_one_process_at_the_same_global_batch_continues_exactly_in_samples(tmp_path):
    """2 processes x 4 stopped by a signal at step 5 (stop at 8), resumed as 1 process x 8: from
    step 8 on, the same images per step and the same lr as an uninterrupted 2-process run."""
    whole = probe(tmp_path / "whole_out", tmp_path / "whole")
    stopped = probe(tmp_path / "stop_out", tmp_path / "run", "--signal-at", "5")
    assert all(r["decision"]["kind"] == "signal" and r["decision"]["step"] == 8 for r in stopped)
    resumed, = probe(tmp_path / "resume_out", tmp_path / "run", processes=1, data__batch_size_per_device="8")
    assert resumed["ended"] == "finished"
    by_step = {}
    for rank in whole:
        for s in rank["steps"]:
            by_step.setdefault(s["step"], {"lr": s["lr"], "samples": []})["samples"] += s["samples"]
    after = {s["step"]: s for s in resumed["steps"]}
    assert sorted(after) == list(range(8, 16))
    for step, s in after.items():
        assert s["lr"] == by_step[step]["lr"]
        assert sorted(s["samples"]) == sorted(by_step[step]["samples"])


def test_resume_at_another_global_batch_is_refused_in_one_line(tmp_path):
    probe(tmp_path / "stop_out", tmp_path / "run", "--signal-at", "1")
    refused, = probe(tmp_path / "out", tmp_path / "run", processes=1)
    assert refused["ended"].startswith("UserError: resume: last.ckpt was trained with a global batch of 8 "
                                       "(2 process(es) x 4); this run's is 4 (1 x 4): set "
                                       "--data.batch_size_per_device 8"), refused["ended"]
    assert "\n" not in refused["ended"]
