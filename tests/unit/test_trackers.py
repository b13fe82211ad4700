"""--report-to: what each tracker wrote, read back with that tracker's own reader, against
metrics.jsonl; resume after a kill logs every step exactly once."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.training import trackers
from softprompt.training.trainer import TrainConfig

from ..conftest import write_sentiment_jsonl
from .training_fixtures import Killed, die_at, make_trainer, train_cmd


def _metrics(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _tensorboard(out) -> dict[str, dict[int, float]]:
    """Scalars as TensorBoard shows them (its reader also applies the resume purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(out / "tensorboard" / trackers.PROJECT), size_guidance={"scalars": 0}
    )
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _mlflow_history(out, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trackers.mlflow_uri(out))
    (experiment,) = [e for e in client.search_experiments() if e.name == trackers.PROJECT]
    (run,) = client.search_runs([experiment.experiment_id])
    return run, sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


# ---------------------------------------------------------------- names and records


@pytest.mark.parametrize(
    "names, fragment",
    [
        (["tensorbored"], "unknown tracker 'tensorbored'"),
        (["comet_ml"], "does not support"),
        (["all", "wandb"], "stand alone"),
    ],
)
def test_bad_report_to_is_a_config_error_naming_the_tracker(names, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(report_to=names)


def test_report_to_names_all_and_none_and_a_missing_package(monkeypatch):
    assert TrainConfig(report_to="tensorboard, mlflow").report_to == ["tensorboard", "mlflow"]
    assert trackers.resolve_report_to(["none"]) == []
    monkeypatch.setattr(trackers, "_installed", lambda name: name != "wandb")
    assert trackers.resolve_report_to(["all"]) == ["tensorboard", "trackio", "mlflow"]
    with pytest.raises(ConfigError, match="wandb not installed"):
        trackers.resolve_report_to(["tensorboard", "wandb"])


def test_cli_unknown_tracker_is_one_clear_error_line(capsys):
    code = main(
        [
            "train",
            "--task",
            "t",
            "--data",
            "x.jsonl",
            "--bank",
            "b",
            "--report-to",
            "tensorboard,bogus",
        ]
    )
    assert code == 2 and "error: report_to: unknown tracker 'bogus'" in capsys.readouterr().err


def test_scalars_map_a_step_record_with_validation_and_zero_shot():
    record = {
        "step": 3,
        "loss": 0.5,
        "lr": 0.01,
        "seconds": 0.5,
        "examples": 4,
        "grad_norm": 2.0,
        "prompt_grad_norms": {"sentiment": [0.1, 0.2]},
        "prompt_norms": {"sentiment": [1.0, 2.0]},
        "validation": {
            "metric": 0.75,
            "tasks": {"sentiment": {"accuracy": 0.75, "n": 8, "labels": ["a"]}},
            "zero_shot": {"metric": 0.5, "tasks": {"sentiment": {"accuracy": 0.5}}},
        },
    }
    assert trackers.scalars(record) == {
        "train/loss": 0.5,
        "train/learning_rate": 0.01,
        "train/grad_norm": 2.0,
        "train/examples_per_second": 8.0,
        "prompt_grad_norm/sentiment/v0": 0.1,
        "prompt_grad_norm/sentiment/v1": 0.2,
        "prompt_norm/sentiment/v0": 1.0,
        "prompt_norm/sentiment/v1": 2.0,
        "eval/metric": 0.75,
        "eval/sentiment/accuracy": 0.75,
        "eval/sentiment/n": 8.0,
        "eval_zero_shot/metric": 0.5,
        "eval_zero_shot/sentiment/accuracy": 0.5,
    }


# ---------------------------------------------------------------- TensorBoard and MLflow, with a resume


def test_tensorboard_and_mlflow_hold_every_step_once_across_a_kill_and_resume(
    tiny_llama, tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    config = {
        "max_steps": 6,
        "eval_steps": 3,
        "save_steps": 2,
        "report_to": ["tensorboard", "mlflow"],
    }
    first = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, out, **config)
    first.on_step = die_at(6)  # killed after step 5 was logged; the last checkpoint is at step 4
    with pytest.raises(Killed):
        first.train()
    assert max(_metrics(out)) == 5
    assert set(_tensorboard(out)["train/loss"]) == {1, 2, 3, 4}  # 5: no checkpoint covers it
    second = make_trainer(tiny_llama, tiny_tokenizer, tmp_path, out, **config)
    assert second.load_checkpoint() and second.step == 4
    second.train()

    metrics, board = _metrics(out), _tensorboard(out)
    for step in range(1, 7):
        assert board["train/loss"][step] == pytest.approx(metrics[step]["loss"], rel=1e-6)
        assert board["train/learning_rate"][step] == pytest.approx(metrics[step]["lr"], rel=1e-6)
        assert board["train/grad_norm"][step] == pytest.approx(metrics[step]["grad_norm"], rel=1e-6)
    for i, norm in enumerate(metrics[6]["prompt_grad_norms"]["sentiment"]):
        assert board[f"prompt_grad_norm/sentiment/v{i}"][6] == pytest.approx(norm, rel=1e-6)
    assert set(board["eval/sentiment/accuracy"]) == {0, 3, 6}  # step 0: the untrained prompt
    assert (
        board["eval_zero_shot/sentiment/accuracy"][0]
        == metrics[0]["validation"]["zero_shot"]["metric"]
    )
    assert board["eval/metric"][6] == pytest.approx(metrics[6]["validation"]["metric"])

    run, history = _mlflow_history(out, "train/loss")  # one run, resumed by id
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [v for _, v in history] == pytest.approx(
        [metrics[s]["loss"] for s in range(1, 7)], rel=1e-6
    )
    assert (
        run.data.params["max_steps"] == "6" and run.data.params["report_to"] == "tensorboard,mlflow"
    )
    _, accuracy = _mlflow_history(out, "eval/sentiment/accuracy")
    assert [step for step, _ in accuracy] == [0, 3, 6]


# ---------------------------------------------------------------- trackio and W&B through the CLI


def _wandb_history(run_file) -> dict[int, dict]:
    """History rows of an offline W&B run file, read with W&B's own record type. The file is
    LevelDB's log format (32 KiB blocks of checksum, length, type, data) after a 7-byte header;
    the wandb package has no Python reader of its own any more (its Go core reads them)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, rows = run_file.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows[record.history.step.num] = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
        elif kind == 0:
            break
    return rows


def test_cli_report_to_trackio_and_wandb_offline(tiny_model_dir, tmp_path):
    data = write_sentiment_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("WANDB_MODE", None)
    done = subprocess.run(
        train_cmd(
            tiny_model_dir,
            data,
            tmp_path / "bank",
            out,
            3,
            "--report-to",
            "trackio,wandb",
            "--save-steps",
            "2",
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _metrics(out)

    read = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            f"print(json.dumps(SQLiteStorage.get_logs({trackers.PROJECT!r}, 'run')))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    logged = {row["step"]: row for row in json.loads(read.stdout.splitlines()[-1])}
    assert sorted(logged) == [0, 1, 2, 3]
    assert [logged[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx(
        [metrics[s]["loss"] for s in (1, 2, 3)]
    )
    assert logged[0]["eval_zero_shot/metric"] == metrics[0]["validation"]["zero_shot"]["metric"]

    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = _wandb_history(Path(run_file))
    assert sorted(rows) == [0, 1, 2, 3]
    assert [rows[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx(
        [metrics[s]["loss"] for s in (1, 2, 3)]
    )
    assert (
        rows[3]["eval/sentiment/accuracy"]
        == metrics[3]["validation"]["tasks"]["sentiment"]["accuracy"]
    )
