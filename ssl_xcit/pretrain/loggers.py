"""The Lightning loggers of a run folder (``trainer.logger``), every one writing under it.

The CSV logger is always there: ``logs/version_N/metrics.csv`` (one segment per (re)start,
never overwritten) is what ``ssl-xcit report`` and the tests read, and it costs nothing.
Besides it, any of:

* ``tensorboard`` (the default): ``<run.dir>/tensorboard``;
* ``wandb``: Weights & Biases in offline mode, files under ``<run.dir>/wandb``; nothing leaves
  the machine until ``wandb sync <run.dir>/wandb/offline-run-*`` uploads them;
* ``mlflow``: an MLflow file store at ``<run.dir>/mlruns`` (``mlflow ui --backend-store-uri
  <run.dir>/mlruns`` shows it); choosing it sets ``MLFLOW_ALLOW_FILE_STORE`` and
  ``MLFLOW_DISABLE_TELEMETRY`` for the training process unless they are set already.

W&B and MLflow are optional dependencies (``pip install -e ".[wandb]"`` / ``".[mlflow]"``;
MLflow's light ``mlflow-skinny`` is enough).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Sequence

from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ssl_xcit.errors import UserError

EXPERIMENT = "ssl-xcit"
"""W&B project and MLflow experiment of every run; the run folder's name names the run."""


def _tensorboard(run_dir: Path) -> Logger:
    return TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False)


class ClosingWandbLogger(WandbLogger):
    """Lightning's W&B logger that also closes its W&B run when training ends: the offline files
    are complete when ``fit`` returns, and a next run in the same process gets a W&B run of its own
    (W&B would otherwise keep logging into the open one until the process exits)."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.experiment.finish(exit_code=0 if status == "success" else 1)


def _wandb(run_dir: Path) -> Logger:
    return ClosingWandbLogger(project=EXPERIMENT, name=run_dir.name, save_dir=str(run_dir), offline=True)


def _mlflow(run_dir: Path) -> Logger:
    # for this training process: MLflow 3 refuses a file store unless told it is wanted, and would
    # report usage over the network; a user's own setting of either wins
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return MLFlowLogger(experiment_name=EXPERIMENT, run_name=run_dir.name,
                        tracking_uri=(run_dir / "mlruns").resolve().as_uri())


BUILDERS: dict[str, tuple[Callable[[Path], Logger], str]] = {
    "tensorboard": (_tensorboard, "tensorboard"),
    "wandb": (_wandb, "wandb"),
    "mlflow": (_mlflow, "mlflow"),
}
"""Logger name → (builder, the module it needs)."""


def build_loggers(names: Sequence[str], run_dir: Path) -> list[Logger]:
    """The CSV logger, then one logger per distinct name of ``names`` (see the module docstring).

    Raises:
        UserError: a logger whose package is not installed, naming the extra that installs it.
    """
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs")]  # version_N per (re)start: never overwrites a segment
    for name in dict.fromkeys(names):
        build, module = BUILDERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"trainer.logger: {name} needs the {module} package: pip install -e \".[{name}]\"")
        loggers.append(build(run_dir))
    return loggers
