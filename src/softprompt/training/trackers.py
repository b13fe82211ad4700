"""Experiment trackers (`--report-to`): the training metrics, mirrored to TensorBoard, trackio,
MLflow and W&B through accelerate's trackers, every one local or offline.

`metrics.jsonl` stays the record of a run; this module maps each of its records to scalars
(`train/loss`, `eval/<task>/accuracy`, `prompt_grad_norm/<task>/v<i>`, ...) and hands them to
`Accelerator.log`. Where each tracker writes (under the run's output dir unless noted):

- tensorboard: `tensorboard/softprompt/` event files (`tensorboard --logdir <output>/tensorboard`);
- trackio: trackio's own local store (`~/.cache/huggingface/trackio`, or `$TRACKIO_DIR`),
  project `softprompt`, run named after the output dir (`trackio show --project softprompt`);
- mlflow: `mlflow.db`, MLflow's own default local store (SQLite; its file store now refuses to
  start unless opted into), unless MLFLOW_TRACKING_URI is set; experiment `softprompt`
  (`mlflow ui --backend-store-uri sqlite:///<output>/mlflow.db`);
- wandb: `wandb/offline-run-*` (WANDB_MODE=offline unless set; `wandb sync` uploads it later).

Resume: records reach the trackers only once a checkpoint covers them (`flush` runs after each
checkpoint is on disk), so a run killed between checkpoints has logged nothing that `--resume`
logs again. A resumed run continues the same tracker runs (their ids are kept in the checkpoint):
TensorBoard appends a new event file to the same folder that starts with a purge at the resumed
step, trackio, MLflow and W&B reopen the run by id. Hyperparameters are logged once, by the run
that started at step 0.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from softprompt.errors import ConfigError

log = logging.getLogger(__name__)

PROJECT = "softprompt"
"""The trackio / W&B project and MLflow experiment every run logs to."""

TRACKERS = ("tensorboard", "trackio", "mlflow", "wandb")
"""The trackers `--report-to` accepts, named as in transformers' `TrainingArguments.report_to`."""

NOT_SUPPORTED = (
    "azure_ml",
    "clearml",
    "codecarbon",
    "comet_ml",
    "dagshub",
    "dvclive",
    "flyte",
    "kubeflow",
    "neptune",
    "swanlab",
)
"""transformers' other report_to names: named in the error so nobody thinks it is a typo."""


# ---------------------------------------------------------------- names


def check_report_to(names: list[str]) -> None:
    """Names a config may hold: trackers of TRACKERS, or 'all' or 'none' alone."""
    for name in names:
        if name in NOT_SUPPORTED:
            raise ConfigError(
                f"report_to: {name!r} is a transformers integration softprompt does not "
                f"support; choose from {', '.join(TRACKERS)}, all or none"
            )
        if name not in (*TRACKERS, "all", "none"):
            raise ConfigError(
                f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}, all or none"
            )
    if len(names) > 1 and ({"all", "none"} & set(names)):
        raise ConfigError("report_to: 'all' and 'none' stand alone")


def resolve_report_to(names: list[str]) -> list[str]:
    """The trackers to start: 'all' means every installed one (as in transformers), 'none' none;
    a named tracker whose package is missing is an error, never silently dropped (accelerate
    would drop it)."""
    check_report_to(names)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if _installed(name)]
    missing = [name for name in names if not _installed(name)]
    if missing:
        raise ConfigError(
            f"report_to: {', '.join(missing)} not installed; install "
            f"{' '.join(missing)} (or pip install 'softprompt[trackers]')"
        )
    return list(dict.fromkeys(names))


def _installed(name: str) -> bool:
    """accelerate's own availability test, so what passes here is what accelerate starts."""
    from accelerate import utils

    return getattr(utils, f"is_{name}_available")()


# ---------------------------------------------------------------- records -> scalars


def scalars(record: dict) -> dict[str, float]:
    """One metrics.jsonl record as tracker scalars (keys valid in every tracker)."""
    out: dict[str, float] = {}
    for key, name in (
        ("loss", "train/loss"),
        ("lr", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
    ):
        if key in record:
            out[name] = float(record[key])
    if record.get("seconds"):
        out["train/examples_per_second"] = record["examples"] / record["seconds"]
    for prefix, key in (("prompt_grad_norm", "prompt_grad_norms"), ("prompt_norm", "prompt_norms")):
        for task, norms in record.get(key, {}).items():
            out.update({f"{prefix}/{task}/v{i}": float(v) for i, v in enumerate(norms)})
    validation = record.get("validation")
    if validation:
        out.update(_validation_scalars("eval", validation))
        if "zero_shot" in validation:
            out.update(_validation_scalars("eval_zero_shot", validation["zero_shot"]))
    return out


def _validation_scalars(prefix: str, validation: dict) -> dict[str, float]:
    """The mean metric and every numeric per-task metric (lists such as the confusion matrix stay
    in metrics.jsonl)."""
    out = (
        {f"{prefix}/metric": float(validation["metric"])}
        if validation.get("metric") is not None
        else {}
    )
    for task, metrics in validation.get("tasks", {}).items():
        out.update(
            {
                f"{prefix}/{task}/{k}": float(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    return out


def hyperparameters(values: dict) -> dict[str, str | int | float | bool]:
    """Values every tracker accepts as hyperparameters (TensorBoard's hparams refuse None and lists)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        elif value is None or (isinstance(value, float) and not math.isfinite(value)):
            value = str(value)
        out[key] = value
    return out


# ---------------------------------------------------------------- the trackers of one run


def accelerator_kwargs(names: list[str], output_dir: Path | None) -> dict:
    """What `Accelerator(...)` needs to start `names` (TensorBoard writes under output_dir)."""
    if not names:
        return {}
    if output_dir is None:
        raise ConfigError("report_to needs an output directory (the trackers write under it)")
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": names,
        "project_config": ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")
        ),
    }


class Trackers:
    """The trackers of one training run on `accelerator` (made with `accelerator_kwargs`), used
    on the main process only and started on first need.

    `add(record)` buffers a metrics record; `run_ids()` (stored in each checkpoint) starts the
    trackers; `flush()` logs the buffer once a checkpoint covers it; `resume(ids, step)` continues
    the runs of a checkpoint; `finish()` closes them.
    """

    def __init__(self, accelerator, names: list[str], output_dir: Path | None, config: dict):
        self.accelerator, self.names, self.output_dir, self.config = (
            accelerator,
            names,
            output_dir,
            config,
        )
        self.pending: list[dict] = []
        self.started = False
        self.resumed_ids: dict[str, str] = {}
        self.first_step = 0  # the first step this process logs: TensorBoard purges from there

    def resume(self, ids: dict[str, str] | None, step: int) -> None:
        """Continue the tracker runs of a checkpoint taken at `step` (a restart at step 0 is a
        fresh run: nothing before it was checkpointed, so there is nothing to continue)."""
        if step > 0:
            self.resumed_ids, self.first_step = dict(ids or {}), step + 1

    def add(self, record: dict) -> None:
        if self.names:
            self.pending.append(record)

    def run_ids(self) -> dict[str, str]:
        """The tracker runs' ids, to find them again on resume (starts the trackers)."""
        if not self.names:
            return {}
        self._start()
        ids = {}
        if "mlflow" in self.names:
            ids["mlflow"] = self.accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        if "wandb" in self.names:
            ids["wandb"] = self.accelerator.get_tracker("wandb", unwrap=True).id
        if "trackio" in self.names:
            ids["trackio"] = self.accelerator.get_tracker("trackio", unwrap=True).name
        return ids

    def flush(self) -> None:
        """Log the buffered records (called once a checkpoint covering them is on disk)."""
        if not self.pending:
            return
        self._start()
        for record in self.pending:
            self.accelerator.log(scalars(record), step=record["step"])
        self.pending.clear()

    def finish(self) -> None:
        """Close the tracker runs. Not `Accelerator.end_training`: that also destroys the process
        group, which the caller may still need (FSDP evaluation after training is collective).
        Records no checkpoint covers are dropped: a resume logs them again."""
        if self.started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self.started = False
        self.pending.clear()

    def _start(self) -> None:
        if self.started:
            return
        if "mlflow" in self.names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(mlflow_uri(self.output_dir))
        resuming = bool(self.resumed_ids)
        self.accelerator.init_trackers(
            PROJECT,
            config=None if resuming else hyperparameters(self.config),
            init_kwargs=self._init_kwargs(),
        )
        self.started = True
        log.info(
            "trackers started: %s (%s)",
            ", ".join(self.names),
            "resumed" if resuming else "new runs",
        )

    def _init_kwargs(self) -> dict:
        ids, run_name = self.resumed_ids, self.output_dir.resolve().name
        kwargs = {
            "tensorboard": {"purge_step": self.first_step},
            "mlflow": {
                "run_id": ids.get("mlflow"),
                "run_name": run_name,
                "logging_dir": str(self.output_dir / "mlartifacts"),
            },
            "wandb": {
                "dir": str(self.output_dir),
                "name": run_name,
                "mode": os.environ.get("WANDB_MODE", "offline"),
            },
            # embed=False: a training run never launches trackio's dashboard
            "trackio": {"name": ids.get("trackio", run_name), "embed": False},
        }
        if "wandb" in ids:
            kwargs["wandb"].update(id=ids["wandb"], resume="allow")
        if "trackio" in ids:
            kwargs["trackio"]["resume"] = "allow"
        return {name: kwargs[name] for name in self.names}


def mlflow_uri(output_dir: Path) -> str:
    """The MLflow store of a run that has no MLFLOW_TRACKING_URI."""
    return "sqlite:///" + str((output_dir / "mlflow.db").resolve())
