"""The CLI end to end on a tiny local model folder: train (multi-task), eval, bank verbs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softprompt.bank import PromptBank, SavedPrompt
from softprompt.cli import main
from softprompt.model.loading import load_model
from softprompt.prompting.prompted import PromptedModel

from ..conftest import NEGATIVE, POSITIVE, build_tiny_model, write_sentiment_jsonl

TEMPLATE = "review : {text} sentiment :"


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def trained_bank(tiny_model_dir, tmp_path, capsys):
    data = write_sentiment_jsonl(tmp_path / "sentiment.jsonl")
    topic = tmp_path / "topic.jsonl"
    topic.write_text(
        "".join(
            json.dumps({"text": t, "label": "movie" if "movie" in t or "film" in t else "other"})
            + "\n"
            for t in POSITIVE + NEGATIVE
        )
    )
    bank = tmp_path / "bank"
    code, out, err = _run(
        capsys,
        "train",
        "--model",
        tiny_model_dir,
        "--task",
        "sentiment",
        "--task",
        "topic",
        "--data",
        data,
        "--data",
        str(topic),
        "--template",
        TEMPLATE,
        "--template",
        "{text} topic :",
        "--labels",
        "negative,positive",
        "--labels",
        "other,movie",
        "--num-virtual-tokens",
        "3",
        "--max-steps",
        "6",
        "--eval-steps",
        "3",
        "--eval-data",
        data,
        "--eval-data",
        str(topic),
        "--per-device-train-batch-size",
        "4",
        "--bf16",
        "no",
        "--bank",
        str(bank),
        "--output-dir",
        str(tmp_path / "run"),
        "--prompt-type",
        "soft",
        "--json",
    )
    assert code == 0, err
    return bank, _last_json(out), data


def test_train_default_is_a_deep_prompt_that_eval_and_generate_load(
    tiny_model_dir, tmp_path, capsys
):
    data = write_sentiment_jsonl(tmp_path / "sentiment.jsonl")
    bank = tmp_path / "bank"
    code, out, err = _run(
        capsys,
        "train",
        "--model",
        tiny_model_dir,
        "--task",
        "sentiment",
        "--data",
        data,
        "--template",
        TEMPLATE,
        "--labels",
        "negative,positive",
        "--num-virtual-tokens",
        "3",
        "--max-steps",
        "4",
        "--eval-steps",
        "2",
        "--eval-data",
        data,
        "--bf16",
        "no",
        "--per-device-train-batch-size",
        "4",
        "--bank",
        str(bank),
        "--json",
    )
    assert code == 0, err
    saved = PromptBank(bank).load("sentiment")
    assert saved.kind == "deep" and saved.config["peft_type"] == "PREFIX_TUNING"
    assert saved.meta["training"]["learning_rate"] == 1e-2  # the deep default
    assert _last_json(out)["trainable_parameters"] == saved.embeddings.numel()
    code, out, err = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--bank",
        str(bank),
        "--task",
        "sentiment",
        "--data",
        data,
        "--json",
    )
    assert code == 0, err
    assert _last_json(out)["n"] == 40
    code, out, err = _run(
        capsys,
        "generate",
        "--model",
        tiny_model_dir,
        "--bank",
        str(bank),
        "--task",
        "sentiment",
        "--max-new-tokens",
        "2",
        "--json",
        "a fine film",
    )
    assert code == 0, err
    assert len(_last_json(out)["outputs"]) == 1


def test_bad_input_learning_rate_must_be_a_number_or_auto(tiny_model_dir, tmp_path, capsys):
    data = write_sentiment_jsonl(tmp_path / "sentiment.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        _run(
            capsys,
            "train",
            "--model",
            tiny_model_dir,
            "--task",
            "s",
            "--data",
            data,
            "--labels",
            "negative,positive",
            "--bank",
            str(tmp_path / "bank"),
            "--learning-rate",
            "fast",
        )
    assert exit_info.value.code == 2 and "--learning-rate: invalid" in capsys.readouterr().err


def test_train_several_tasks_at_once_lands_each_prompt_in_the_bank(trained_bank):
    bank, summary, _ = trained_bank
    assert PromptBank(bank).names() == ["sentiment", "topic"]
    assert summary["trainable_parameters"] == 2 * 3 * 32
    topic = PromptBank(bank).load("topic")
    assert topic.meta["template"] == "{text} topic :" and topic.meta["verbalizer"]["labels"] == [
        "other",
        "movie",
    ]
    assert (
        topic.meta["fingerprint"]["hidden_size"] == 32
        and "best_validation" in topic.meta["metrics"]
    )


def test_train_saves_the_runs_plots_with_each_prompt_in_the_bank(trained_bank, tmp_path):
    bank, summary, _ = trained_bank
    run = tmp_path / "run"
    assert sorted(Path(p).name for p in summary["plots"]) == [
        "grad_norms.png",
        "loss.png",
        "validation.png",
    ]
    for task in ("sentiment", "topic"):
        for name in ("loss", "validation", "grad_norms"):
            assert PromptBank(bank).read_plot(task, name) == (run / f"{name}.png").read_bytes()


def test_eval_json_last_line_and_zero_shot(trained_bank, tiny_model_dir, capsys):
    bank, _, data = trained_bank
    code, out, _ = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--bank",
        str(bank),
        "--task",
        "sentiment",
        "--data",
        data,
        "--json",
    )
    metrics = _last_json(out)
    assert (
        code == 0
        and metrics["n"] == 40
        and {"accuracy", "macro_f1", "confusion_matrix"} <= metrics.keys()
    )
    assert sum(map(sum, metrics["confusion_matrix"])) == 40
    code, out, _ = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--zero-shot",
        "--template",
        TEMPLATE,
        "--labels",
        "negative,positive",
        "--data",
        data,
        "--json",
    )
    assert code == 0 and _last_json(out)["zero_shot"] is True


def test_bank_list_show_export_import_rm(trained_bank, tiny_model_dir, tmp_path, capsys):
    bank, _, _ = trained_bank
    code, out, _ = _run(capsys, "bank", "list", "--bank", str(bank), "--model", tiny_model_dir)
    assert code == 0 and out.splitlines() == ["sentiment\tok", "topic\tok"]
    code, out, _ = _run(capsys, "bank", "show", "--bank", str(bank), "topic")
    assert code == 0 and _last_json(out)["shape"] == [3, 32]
    assert (
        _run(capsys, "bank", "export", "--bank", str(bank), "topic", str(tmp_path / "exported"))[0]
        == 0
    )
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    assert (
        _run(capsys, "bank", "import", "--bank", str(bank), str(tmp_path / "exported"), "topic2")[0]
        == 0
    )
    assert _run(capsys, "bank", "rm", "--bank", str(bank), "topic")[0] == 0
    assert PromptBank(bank).names() == ["sentiment", "topic2"]


def test_bank_list_shows_a_task_from_another_base_model_as_unusable(
    tiny_model_dir, tmp_path, capsys
):
    bank = PromptBank(tmp_path / "bank")
    other = build_tiny_model("llama", seed=1)  # same shape, other weights: another base model
    other.config.name_or_path = "other/tiny-llama"
    PromptedModel(other, {"foreign": torch.randn(2, 32)}).save_task("foreign", bank)
    mine = PromptedModel(load_model(tiny_model_dir), {"mine": torch.randn(2, 32)})
    mine.save_task("mine", bank)
    bank.save(SavedPrompt("peft", torch.randn(2, 32), mine.saved_prompt("mine").config))
    bank.save(PromptedModel(other, {"wide": torch.randn(2, 16)}).saved_prompt("wide"))
    (bank.root / "broken").mkdir()
    (bank.root / "broken" / "adapter_config.json").write_text("{}")

    code, out, _ = _run(capsys, "bank", "list", "--bank", str(bank.root), "--model", tiny_model_dir)

    assert code == 0
    status = dict(line.split("\t", 1) for line in out.splitlines())
    assert sorted(status) == ["broken", "foreign", "mine", "peft", "wide"]
    assert status["mine"] == "ok"
    assert status["peft"] == "ok (no base-model fingerprint: not verified)"
    assert status["foreign"].startswith(f"UNUSABLE with model {tiny_model_dir!r}: ")
    assert "trained on 'other/tiny-llama'" in status["foreign"]
    assert "embedding_sha256" in status["foreign"]
    assert status["wide"].startswith("UNUSABLE") and "hidden size 16" in status["wide"]
    assert status["broken"].startswith("BROKEN") and "peft_type" in status["broken"]


def test_generate_with_a_bank_task_and_without(trained_bank, tiny_model_dir, capsys):
    bank, _, _ = trained_bank
    code, out, _ = _run(
        capsys,
        "generate",
        "--model",
        tiny_model_dir,
        "--bank",
        str(bank),
        "--task",
        "sentiment",
        "--max-new-tokens",
        "3",
        "--json",
        "great movie",
        "bad plot",
    )
    assert code == 0 and len(_last_json(out)["outputs"]) == 2
    code, out, _ = _run(
        capsys, "generate", "--model", tiny_model_dir, "--prompt", "none", "--json", "great movie"
    )
    assert code == 0 and _last_json(out)["task"] is None


def test_bad_input_errors_are_one_clear_line(trained_bank, tiny_model_dir, tmp_path, capsys):
    bank, _, data = trained_bank
    code, _, err = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--bank",
        str(bank),
        "--task",
        "nope",
        "--data",
        data,
    )
    assert code == 2 and "unknown task 'nope'" in err and "sentiment" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "great movie", "label": 1}\n{"label": 0}\n{"text": "bad", "label": 0}\n'
    )
    code, _, err = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--zero-shot",
        "--labels",
        "negative,positive",
        "--template",
        TEMPLATE,
        "--data",
        str(bad),
    )
    assert code == 2 and f"{bad}:2" in err and "text" in err
    code, out, err = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--zero-shot",
        "--labels",
        "negative,positive",
        "--template",
        TEMPLATE,
        "--data",
        str(bad),
        "--skip-bad-rows",
        "--json",
    )
    assert code == 0 and _last_json(out)["n"] == 2 and "skipped 1 bad rows" in err
    code, _, err = _run(capsys, "info", "--model", str(tmp_path / "missing.gguf"))
    assert code == 2 and "missing.gguf" in err


def test_info_reports_parameters_and_fingerprint(tiny_model_dir, capsys):
    code, out, _ = _run(capsys, "info", "--model", tiny_model_dir, "--json")
    info = _last_json(out)
    assert code == 0 and info["hidden_size"] == 32 and info["trainable_parameters"] == 0
    assert info["parameters"] > 0 and len(info["fingerprint"]["embedding_sha256"]) == 16


def test_inspect_nearest_tokens_of_a_text_initialised_prompt(trained_bank, tiny_model_dir, capsys):
    bank, _, _ = trained_bank
    code, out, _ = _run(capsys, "inspect", "--model", tiny_model_dir, "--bank", str(bank), "--json")
    report = _last_json(out)
    assert code == 0 and set(report["tasks"]) == {"sentiment", "topic"}
    assert (
        len(report["tasks"]["topic"]["nearest_tokens"]) == 3
        and report["similarity"]["topic"]["topic"] == 1.0
    )
    a, b = (PromptBank(bank).load(name).embeddings.mean(0) for name in ("sentiment", "topic"))
    expected = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert report["similarity"]["sentiment"]["topic"] == pytest.approx(expected, abs=1e-4)
    assert (
        report["similarity"]["topic"]["sentiment"]
        == report["similarity"]["sentiment"]["topic"]
        < 0.999
    )


def test_multi_task_training_moves_every_prompt(trained_bank):
    _, summary, _ = trained_bank
    lines = [
        json.loads(line)
        for line in (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [
        line for line in lines if "prompt_norms" in line
    ]  # norms are logged before each step's update
    for task in ("sentiment", "topic"):
        first = next(i for i, line in enumerate(steps) if max(line["prompt_grad_norms"][task]) > 0)
        assert first + 1 < len(steps), f"{task} got no gradient before the last step"
        later = [line["prompt_norms"][task] for line in steps[first + 1 :]]
        assert any(norms != steps[0]["prompt_norms"][task] for norms in later), (
            task
        )  # an update moved it


def test_inspect_text_init_decodes_to_its_own_words(tiny_model, tiny_tokenizer):
    from softprompt.prompting.inspection import nearest_tokens
    from softprompt.prompting.prompted import PromptedModel
    from softprompt.prompting.soft import PromptTuningConfig

    config = PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="text", prompt_tuning_init_text="great awful movie"
    )
    prompted = PromptedModel(tiny_model, {"t": config}, tokenizer=tiny_tokenizer)
    near = nearest_tokens(
        tiny_model.get_input_embeddings(), tiny_tokenizer, prompted.table.get("t").detach(), k=1
    )
    assert [row[0][0] for row in near] == ["great", "awful", "movie"] and near[0][0][1] > 0.999


def _train_args(model_dir, data, tmp_path, *extra):
    return [
        "train",
        "--model",
        model_dir,
        "--task",
        "sentiment",
        "--data",
        str(data),
        "--template",
        TEMPLATE,
        "--labels",
        "negative,positive",
        "--num-virtual-tokens",
        "2",
        "--max-steps",
        "2",
        "--bf16",
        "no",
        "--bank",
        str(tmp_path / "bank"),
        "--output-dir",
        str(tmp_path / "run"),
        *extra,
    ]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
def test_bad_input_learning_rate_is_one_clear_line(tiny_model_dir, tmp_path, capsys, value):
    data = write_sentiment_jsonl(tmp_path / "d.jsonl")
    code, _, err = _run(
        capsys, *_train_args(tiny_model_dir, data, tmp_path, "--learning-rate", value)
    )
    assert (
        code == 2
        and "error: learning_rate must be a finite number > 0" in err
        and "Traceback" not in err
    )


def test_bad_input_template_with_a_format_spec_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    data = write_sentiment_jsonl(tmp_path / "d.jsonl")
    args = _train_args(tiny_model_dir, data, tmp_path)
    args[args.index(TEMPLATE)] = "review : {text:>300000}"
    code, _, err = _run(capsys, *args)
    assert (
        code == 2
        and "format specs like :>300000 are not supported" in err
        and "Traceback" not in err
    )


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"text": "good movie", "label": ' + "1" * 5000 + "}", "a number longer than 4300 digits"),
        ('{"text": "good \\ud800 movie", "label": 1}', "lone surrogate"),
    ],
)
def test_bad_input_data_line_is_one_clear_line_naming_file_and_line(
    tiny_model_dir, tmp_path, capsys, line, fragment
):
    data = tmp_path / "d.jsonl"
    data.write_text(f'{{"text": "{POSITIVE[0]}", "label": 1}}\n' + line + "\n")
    code, _, err = _run(capsys, *_train_args(tiny_model_dir, data, tmp_path))
    assert code == 2 and f"{data}:2" in err and fragment in err and "Traceback" not in err


def test_bad_input_skip_bad_rows_skips_malformed_json_and_array_lines_with_a_count(
    tiny_model_dir, tmp_path, capsys
):
    data = tmp_path / "d.jsonl"
    data.write_text(
        f'{{"text": "{POSITIVE[0]}", "label": 1}}\n{{"text": oops\n[1, 2]\n'
        f'{{"text": "{NEGATIVE[0]}", "label": 0}}\n'
    )
    code, out, err = _run(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--zero-shot",
        "--labels",
        "negative,positive",
        "--template",
        TEMPLATE,
        "--data",
        str(data),
        "--skip-bad-rows",
        "--json",
    )
    assert code == 0 and _last_json(out)["n"] == 2 and "skipped 2 bad rows" in err


def test_bad_input_reading_commands_never_create_the_bank_folder(tiny_model_dir, tmp_path, capsys):
    data = write_sentiment_jsonl(tmp_path / "d.jsonl")
    missing = tmp_path / "no" / "such" / "bank"
    for args in (
        ["eval", "--model", tiny_model_dir, "--bank", str(missing), "--task", "x", "--data", data],
        ["generate", "--model", tiny_model_dir, "--bank", str(missing), "--task", "x", "fun"],
        ["bank", "list", "--bank", str(missing)],
        ["bank", "show", "--bank", str(missing), "x"],
        ["inspect", "--model", tiny_model_dir, "--bank", str(missing)],
    ):
        code, _, err = _run(capsys, *args)
        assert code == 2 and f"bank folder {missing} does not exist" in err, (args, err)
    assert not (tmp_path / "no").exists()
