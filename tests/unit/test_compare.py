"""`compare`: every method end to end on a tiny model; counts and bytes checked against shapes."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.training.compare import (
    METHODS,
    CompareConfig,
    markdown_table,
    model_digest,
    run_compare,
)

from ..conftest import build_tiny_model, build_tiny_tokenizer

STEPS, BATCH, N_VIRTUAL, R = 2, 4, 4, 8
TEMPLATE = "review : {text} sentiment :"
ROWS = [
    ("great movie", "positive"),
    ("good fun film", "positive"),
    ("i love this movie", "positive"),
    ("bad movie", "negative"),
    ("awful boring film", "negative"),
    ("i hate this plot", "negative"),
]


def _write_data(path):
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS * 2))
    return str(path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One run of every method (the expensive part, shared by the tests below)."""
    root = tmp_path_factory.mktemp("compare")
    model_dir = root / "tiny"
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    data = _write_data(root / "data.jsonl")
    before = model_digest(build_tiny_model("llama"))
    events = []
    results = run_compare(
        str(model_dir),
        data,
        data,
        template=TEMPLATE,
        labels=["negative", "positive"],
        methods=["full", "lora", "deep_prompt", "prompt"],
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        num_virtual_tokens=N_VIRTUAL,
        lora_r=R,
        switch_repeats=1,
        bf16="no",
        output_dir=root / "out",
        progress=events.append,
    )
    return {
        "results": results,
        "rows": {r["method"]: r for r in results["methods"]},
        "out": root / "out",
        "events": events,
        "digest_before": before,
        "model": build_tiny_model("llama"),
    }


COLUMNS = {
    "trainable_params": int,
    "bytes_per_task": int,
    "peak_memory_bytes": int,
    "seconds_per_step": float,
    "examples_per_second": float,
    "accuracy": float,
    "task_switch_seconds": float,
    "memory_bytes_100_tasks": int,
}


def test_every_method_and_column_present_and_typed(compared):
    results = compared["results"]
    assert [r["method"] for r in results["methods"]] == list(METHODS)  # zero_shot always added
    assert {"model", "data", "machine", "date"} <= results.keys()
    for row in results["methods"]:
        for column, kind in COLUMNS.items():
            value = row[column]
            if row["method"] == "zero_shot" and column in (
                "peak_memory_bytes",
                "seconds_per_step",
                "examples_per_second",
            ):
                assert value is None, column
                continue
            assert isinstance(value, kind) and not isinstance(value, bool), (
                row["method"],
                column,
                value,
            )
            assert value >= 0, (row["method"], column)
        assert 0.0 <= row["accuracy"] <= 1.0
        if row["method"] != "zero_shot":
            assert (
                row["steps"] == STEPS
                and row["peak_memory_bytes"] > 0
                and row["seconds_per_step"] > 0
            )
            assert row["task_switch_seconds"] > 0
    train_events = [e for e in compared["events"] if e["stage"] == "train"]
    assert len(train_events) == STEPS * 4


def test_trainable_params_equal_counts_from_shapes(compared):
    rows, model = compared["rows"], compared["model"]
    config = model.config
    d, layers, kv_heads = config.hidden_size, config.num_hidden_layers, config.num_key_value_heads
    head_dim = d // config.num_attention_heads
    q_in, q_out, v_in, v_out = d, config.num_attention_heads * head_dim, d, kv_heads * head_dim
    assert rows["zero_shot"]["trainable_params"] == 0
    assert rows["prompt"]["trainable_params"] == N_VIRTUAL * d
    assert rows["deep_prompt"]["trainable_params"] == layers * 2 * kv_heads * N_VIRTUAL * head_dim
    assert rows["lora"]["trainable_params"] == layers * (R * (q_in + q_out) + R * (v_in + v_out))
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in model.parameters())


def test_bytes_per_task_match_tensor_bytes(compared):
    model = compared["model"]
    lora_tensors = model.config.num_hidden_layers * 2 * 2  # q_proj, v_proj x (A, B)
    for method in ("prompt", "deep_prompt", "lora", "full"):
        row = compared["rows"][method]
        tensor_bytes = row["trainable_params"] * 4  # float32
        tensors = {
            "prompt": 1,
            "deep_prompt": 1,
            "lora": lora_tensors,
            "full": len(model.state_dict()),
        }[method]
        header = row["weights_bytes"] - tensor_bytes  # safetensors: 8-byte length + JSON header
        assert 8 < header <= 16 + 160 * tensors, (method, header)
        assert (
            row["weights_bytes"] < row["bytes_per_task"] <= row["weights_bytes"] + 16_384
        )  # + config files
        assert any(name.endswith(".safetensors") for name in row["saved_files"])


def test_memory_for_100_tasks_is_computed_from_the_shapes(compared):
    rows = compared["rows"]
    base = sum(p.numel() * 4 for p in compared["model"].parameters())
    assert rows["zero_shot"]["memory_bytes_100_tasks"] == base
    for method in ("prompt", "deep_prompt", "lora"):
        assert (
            rows[method]["memory_bytes_100_tasks"]
            == base + 100 * rows[method]["trainable_params"] * 4
        )
    assert rows["full"]["memory_bytes_100_tasks"] == 100 * base


def test_prompt_tuning_leaves_the_base_bit_identical(compared):
    assert compared["rows"]["prompt"]["base_unchanged"] is True
    assert compared["rows"]["deep_prompt"]["base_unchanged"] is True
    assert (
        compared["rows"]["full"]["base_unchanged"] is False
    )  # the same check on a trained base sees it change
    model = build_tiny_model("llama")
    assert model_digest(model) == compared["digest_before"]
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-6
    assert model_digest(model) != compared["digest_before"]  # the check does see one changed value


def test_outputs_json_markdown_and_png(compared):
    out = compared["out"]
    assert json.loads((out / "compare.json").read_text()) == json.loads(
        json.dumps(compared["results"])
    )
    table = (out / "compare.md").read_text()
    assert table == markdown_table(compared["results"]) + "\n"
    for label in ("zero-shot", "prompt tuning", "deep prompt", "LoRA", "full fine-tuning"):
        assert label in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "saved").exists()  # saved tasks are temporary unless keep_saved


def test_cli_compare_prints_the_table_and_writes_files(compared, tmp_path, capsys):
    from softprompt.cli import main

    model_dir = str(compared["out"].parent / "tiny")
    data = str(compared["out"].parent / "data.jsonl")
    code = main(
        [
            "compare",
            "--model",
            model_dir,
            "--data",
            data,
            "--eval-data",
            data,
            "--template",
            TEMPLATE,
            "--labels",
            "negative,positive",
            "--methods",
            "prompt",
            "--max-steps",
            "1",
            "--per-device-train-batch-size",
            "2",
            "--switch-repeats",
            "1",
            "--bf16",
            "no",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| prompt tuning |" in out and "| zero-shot (reference) |" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"compare.json", "compare.md", "compare.png"}
    methods = [r["method"] for r in json.loads((tmp_path / "compare.json").read_text())["methods"]]
    assert methods == ["zero_shot", "prompt"]


def test_config_rejects_unknown_methods():
    with pytest.raises(ConfigError, match="unknown method"):
        CompareConfig(methods=["prompt", "adapter"])


def test_seeds_run_each_method_per_seed_and_report_mean_and_std(compared, tmp_path, capsys):
    from softprompt.cli import main

    model_dir = str(compared["out"].parent / "tiny")
    data = str(compared["out"].parent / "data.jsonl")
    code = main(
        [
            "compare",
            "--model",
            model_dir,
            "--data",
            data,
            "--eval-data",
            data,
            "--template",
            TEMPLATE,
            "--labels",
            "negative,positive",
            "--methods",
            "prompt",
            "--max-steps",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--switch-repeats",
            "1",
            "--bf16",
            "no",
            "--seeds",
            "0,1,2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "compare.json").read_text())
    runs = [(r["method"], r["seed"]) for r in results["runs"]]
    assert runs == [("zero_shot", 0), ("prompt", 0), ("prompt", 1), ("prompt", 2)]
    prompt = next(r for r in results["methods"] if r["method"] == "prompt")
    per_seed = [r["accuracy"] for r in results["runs"] if r["method"] == "prompt"]
    assert prompt["accuracy_per_seed"] == per_seed and prompt["seeds"] == [0, 1, 2]
    assert prompt["accuracy"] == pytest.approx(sum(per_seed) / 3)
    losses = {r["final_loss"] for r in results["runs"] if r["method"] == "prompt"}
    assert len(losses) > 1  # the seeds saw other batches
    assert f"{prompt['accuracy']:.3f} +- {prompt['accuracy_std']:.3f}" in capsys.readouterr().out


def test_merge_results_joins_runs_made_apart_into_one_table(compared, tmp_path):
    from softprompt.training.compare import merge_results, write_outputs

    model_dir = str(compared["out"].parent / "tiny")
    data = str(compared["out"].parent / "data.jsonl")
    common = dict(
        template=TEMPLATE,
        labels=["negative", "positive"],
        max_steps=2,
        per_device_train_batch_size=2,
        switch_repeats=1,
        bf16="no",
    )
    together = run_compare(
        model_dir, data, data, methods=["prompt", "lora"], seeds=[0, 1], **common
    )
    parts = [
        run_compare(model_dir, data, data, methods=[m], seeds=[s], **common)
        for s in (0, 1)
        for m in ("prompt", "lora")
    ]
    merged = merge_results(parts)
    assert [(r["method"], r["seed"]) for r in merged["runs"]] == [
        ("zero_shot", 0),
        ("prompt", 0),
        ("lora", 0),
        ("prompt", 1),
        ("lora", 1),
    ]
    assert merged["config"]["methods"] == ["prompt", "lora"] and merged["config"]["seeds"] == [0, 1]
    for row, alone in zip(merged["methods"], together["methods"], strict=True):
        assert row["method"] == alone["method"] and row["seeds"] == alone["seeds"]
        assert row["accuracy_per_seed"] == alone["accuracy_per_seed"]  # same seeds, same runs
        assert row["accuracy_std"] == pytest.approx(alone["accuracy_std"])
    write_outputs(merged, tmp_path)
    assert "Merged from 4 separate compare runs" in (tmp_path / "compare.md").read_text()

    with pytest.raises(ConfigError, match="prompt seed 0 again"):
        merge_results([parts[0], parts[0]])
    other_budget = run_compare(
        model_dir, data, data, methods=["prompt"], seeds=[2], **{**common, "max_steps": 1}
    )
    with pytest.raises(ConfigError, match="config.max_steps"):
        merge_results([parts[0], other_budget])
