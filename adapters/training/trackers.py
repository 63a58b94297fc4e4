"""The figures of metrics.jsonl, also sent to the experiment trackers in `train.report_to`.

Each metrics line (loss, lr, grad norm, tokens/s, memory, eval loss ...) goes to every tracker
at its step, and the recipe goes in once as hyperparameters. Local and offline unless the
tracker's own environment says otherwise:

- tensorboard: event files in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`)
- mlflow: a local SQLite store, OUT/mlflow.db (`mlflow ui --backend-store-uri
  sqlite:///OUT/mlflow.db`), or $MLFLOW_TRACKING_URI; experiment $MLFLOW_EXPERIMENT_NAME
  or "adapters" (MLflow 3 refuses new `./mlruns` file stores, hence SQLite)
- wandb: offline mode under OUT/wandb (`wandb sync OUT/wandb/offline-run-*`), unless
  $WANDB_MODE says otherwise; project $WANDB_PROJECT or "adapters"

Each library is an optional extra (`pip install 'adapterkit[tensorboard]'` ...); none is
needed unless a recipe names it. Only rank 0 reports.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
# The figures of a metrics line that are not sent: the step is the x axis, `finite` a flag.
_NOT_FIGURES = {"step", "finite"}


def check_report_to(names: list[str]) -> None:
    """Fail, naming `train.report_to` and the nearest valid name, on an unknown tracker."""
    for name in names:
        if name not in TRACKERS:
            near = difflib.get_close_matches(str(name), TRACKERS, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(TRACKERS)}"
            raise ConfigError(f"train.report_to: unknown tracker {name!r} ({hint})")


def figures(row: dict) -> dict[str, float]:
    """The numbers of one metrics line that trackers record (finite numbers only)."""
    return {k: float(v) for k, v in row.items()
            if k not in _NOT_FIGURES and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def flat_recipe(recipe: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and None as JSON text."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_recipe(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _need(name: str) -> ImportError:
    return ImportError(f"train.report_to lists {name!r}, which needs the {name} extra: "
                       f"pip install 'adapterkit[{name}]'")


class TensorBoard:
    def __init__(self, out: Path, recipe: dict, step: int):
        try:  # optional extra: torch's writer needs the tensorboard package
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise _need("tensorboard") from None
        # A resumed run drops the events past its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
        for summary in hparams(flat_recipe(recipe), {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, out: Path, recipe: dict, step: int):
        try:  # optional extra
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _need("mlflow") from None
        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve()}/mlflow.db"
        self.client = MlflowClient(tracking_uri=uri)  # a client, not mlflow's global state
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "adapters"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=(out / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        params = [Param(k, str(v)) for k, v in flat_recipe(recipe).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB:
    def __init__(self, out: Path, recipe: dict, step: int):
        try:  # optional extra
            import wandb
        except ImportError:
            raise _need("wandb") from None
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "adapters",
                              dir=str(out), mode=os.environ.get("WANDB_MODE") or "offline",
                              name=out.name, config=recipe, settings=settings,
                              reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Trackers:
    """The trackers of one `fit`; empty (and free) when `train.report_to` is."""

    def __init__(self, trackers: list | None = None):
        self.trackers = trackers or []
        self.last_step = 0

    @classmethod
    def open(cls, run) -> Trackers:
        """Start every tracker the recipe names (rank 0 only); fails before the first step."""
        names = list(run.cfg.train.report_to or [])
        check_report_to(names)
        if not names or not run.dist.main:
            return cls()
        opened: list = []
        try:
            for name in dict.fromkeys(names):
                opened.append(_KINDS[name](run.out, run.cfg.to_dict(), run.step))
        except ImportError as e:
            cls(opened).close()
            raise ConfigError(str(e)) from None
        log.info("reporting to %s", ", ".join(dict.fromkeys(names)))
        return cls(opened)

    def log(self, row: dict) -> None:
        """One metrics line, at its step."""
        values = figures(row)
        if values:
            self.last_step = int(row.get("step", self.last_step))
            for t in self.trackers:
                t.log(self.last_step, values)

    def close(self, failed: bool = False) -> None:
        """End every tracker's run; `failed` when training raised (trackers that keep a
        status record it)."""
        for t in self.trackers:
            try:
                t.close(failed)
            except Exception as e:  # noqa: BLE001 (a tracker's shutdown must not lose the run)
                log.warning("closing %s failed: %s", type(t).__name__, e)
