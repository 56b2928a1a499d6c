"""``trainer.logger``: the CSV file always, TensorBoard by default, W&B and MLflow offline under
the run folder, each receiving the values the CSV file holds."""

from __future__ import annotations

import csv
import importlib.util
import time
from pathlib import Path

import pytest
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from ssl_xcit.cli import main
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.command import parse_pretrain_args
from ssl_xcit.pretrain.loggers import build_loggers
from tests.helpers import tiny_pretrain_args


def test_csv_always_tensorboard_by_default(tmp_path):
    default = parse_pretrain_args([]).options.trainer.logger
    assert [type(x) for x in build_loggers(default, tmp_path)] == [CSVLogger, TensorBoardLogger]
    assert [type(x) for x in build_loggers([], tmp_path)] == [CSVLogger]
    assert len(build_loggers(["tensorboard", "tensorboard"], tmp_path)) == 2
    assert parse_pretrain_args(["--trainer.logger", "tensorboard", "mlflow"]).options.trainer.logger == \
        ["tensorboard", "mlflow"]
    with pytest.raises(UserError, match="trainer.logger"):
        parse_pretrain_args(["--trainer.logger", "neptune"])


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_logger_without_its_package_names_the_extra(tmp_path, monkeypatch, name):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module == name else find_spec(module, *a))
    line = rf'^trainer.logger: {name} needs the {name} package: pip install -e "\.\[{name}\]"$'
    with pytest.raises(UserError, match=line):
        build_loggers(["tensorboard", name], tmp_path)


def tiny_run(run_dir: Path, logger: str, **overrides: str) -> dict[int, float]:
    """A 4-step run logging every 2 steps with ``--trainer.logger logger``; the CSV file's train/loss by step."""
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="32", data__synthetic_resolution="40",
                              trainer__max_steps="4", trainer__max_epochs="1", **overrides)
    assert main(["pretrain", *args, "--trainer.logger", logger]) == 0
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        loss = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert len(loss) == 2, loss
    return loss


@pytest.mark.slow
def test_wandb_offline_under_the_run_folder_one_wandb_run_per_run(tmp_path):
    """Two runs in one process: each run folder holds its own offline W&B run with its own values
    (an open W&B run would otherwise swallow the second run's values)."""
    pytest.importorskip("wandb", reason='W&B is an optional extra: pip install -e ".[wandb]"')
    for name, seed in (("first", "0"), ("second", "1")):
        run_dir = tmp_path / name
        loss = tiny_run(run_dir, "wandb", trainer__seed=seed)
        records, = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # what `wandb sync` uploads
        wanted = [repr(value).encode() for value in loss.values()]  # W&B keeps each value as JSON text
        deadline = time.monotonic() + 60  # W&B's service may write the file after the run has closed
        while not all(w in records.read_bytes() for w in wanted) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(w in records.read_bytes() for w in wanted), (name, loss, records.stat().st_size)


@pytest.mark.slow
def test_mlflow_file_store_under_the_run_folder(tmp_path):
    pytest.importorskip("mlflow", reason='MLflow is an optional extra: pip install -e ".[mlflow]"')
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    loss = tiny_run(run_dir, "mlflow")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run, = client.search_runs([client.get_experiment_by_name("ssl-xcit").experiment_id])
    assert run.info.run_name == "run" and run.data.params["config/model/arch"] == "xcit_nano_12_p8_224"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(loss)
