"""Prompt files and the prompt bank: round trips, atomic saves, bad input, PEFT interop."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from softprompt.bank import (
    CONFIG_FILE,
    META_FILE,
    PNG_SIGNATURE,
    TASK_NAME_PATTERN,
    WEIGHTS_FILE,
    PromptBank,
    SavedPrompt,
    check_compatible,
    peft_prompt_config,
    read_prompt_dir,
    validate_task_name,
    write_prompt_dir,
)
from softprompt.bank import files as bank_files
from softprompt.errors import (
    ConfigError,
    IncompatiblePromptError,
    InvalidTaskNameError,
    PromptFileError,
    UnknownTaskError,
)

FINGERPRINT = {"model_type": "llama", "hidden_size": 8, "vocab_sha256": "abc123"}


@functools.cache
def _config(n_virtual: int, dim: int) -> dict:
    return peft_prompt_config(
        num_virtual_tokens=n_virtual,
        token_dim=dim,
        num_layers=2,
        num_attention_heads=4,
        prompt_tuning_init="class_labels",
        base_model_name_or_path="tiny-llama",
    )


def _prompt(
    name: str = "sentiment",
    *,
    n: int = 4,
    d: int = 8,
    seed: int = 0,
    fill: float | None = None,
    meta: dict | None = None,
) -> SavedPrompt:
    if fill is None:
        emb = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))  # (n, d)
    else:
        emb = torch.full((n, d), float(fill))
    if meta is None:
        meta = {
            "template": "Review: {text}\nSentiment:",
            "verbalizer": {"pos": " positive", "neg": " negative"},
            "fingerprint": FINGERPRINT,
            "metrics": {"accuracy": 0.875, "loss": [1.5, 0.25]},
            "created": "2025-01-01T00:00:00Z",
            "prompt_tuning_init": "class_labels",
            "seed": seed,
        }
    return SavedPrompt(name=name, embeddings=emb, config=dict(_config(n, d)), meta=meta)


def _assert_same(got: SavedPrompt, want: SavedPrompt) -> None:
    assert got.name == want.name
    assert got.embeddings.dtype == torch.float32
    assert torch.equal(got.embeddings.view(torch.int32), want.embeddings.view(torch.int32))
    assert got.config == want.config
    assert got.meta == want.meta


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def _dir_snapshot(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ----------------------------------------------------------------------------- round trips


def test_roundtrip_save_load_bit_exact(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    saved = _prompt()
    # Extreme finite values must survive bit for bit too.
    saved.embeddings[0, :3] = torch.tensor([-0.0, 1e-45, torch.finfo(torch.float32).max])
    path = bank.save(saved)
    assert path == bank.root / "sentiment"
    assert bank.names() == ["sentiment"] and "sentiment" in bank
    _assert_same(bank.load("sentiment"), saved)
    assert set(os.listdir(path)) == {CONFIG_FILE, WEIGHTS_FILE, META_FILE}


def test_roundtrip_export_and_read_prompt_dir_bit_exact(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    saved = _prompt(seed=3)
    bank.save(saved)
    dest = bank.export("sentiment", tmp_path / "out" / "sentiment")
    assert not dest.is_symlink() and (dest / WEIGHTS_FILE).is_file()
    _assert_same(read_prompt_dir(dest), saved)  # the name defaults to the folder name
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_same(read_prompt_dir(bank.export("sentiment", empty), "sentiment"), saved)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_roundtrip_write_prompt_dir_and_plain_tensor_types(tmp_path):
    saved = _prompt(meta={})
    saved.embeddings = saved.embeddings.to(torch.bfloat16)  # stored as float32 anyway
    write_prompt_dir(tmp_path, saved)
    back = read_prompt_dir(tmp_path, "sentiment")
    assert back.embeddings.dtype == torch.float32
    assert torch.equal(back.embeddings, saved.embeddings.float())
    assert back.meta == {} and back.num_virtual_tokens == 4 and back.token_dim == 8
    assert back.fingerprint is None


def test_roundtrip_version_changes_on_every_save_and_delete_removes(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    bank.save(_prompt(seed=1))
    first = bank.version("sentiment")
    assert bank.version("sentiment") == first
    bank.save(_prompt(seed=1))
    assert bank.version("sentiment") != first
    bank.delete("sentiment")
    assert bank.names() == [] and "sentiment" not in bank
    assert not (bank.root / ".versions" / "sentiment").exists()
    with pytest.raises(UnknownTaskError):
        bank.delete("sentiment")


def test_roundtrip_plain_folder_copied_into_bank(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    src = tmp_path / "src"
    src.mkdir()
    old = _prompt("copied", seed=4)
    write_prompt_dir(src, old)
    shutil.copytree(src, bank.root / "copied")
    _assert_same(bank.load("copied"), old)
    plain_version = bank.version("copied")
    new = _prompt("copied", seed=5)
    bank.save(new)  # moves the plain folder aside, then links the new version
    assert (bank.root / "copied").is_symlink()
    assert bank.version("copied") != plain_version
    _assert_same(bank.load("copied"), new)
    bank.delete("copied")
    assert bank.names() == []


# ----------------------------------------------------------------------------- atomic saves


class _Killed(BaseException):
    """Stands in for the process dying: `except Exception` cleanup does not run."""


def _half_write(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise _Killed()


def _killed(*args, **kwargs):
    raise _Killed()


@pytest.mark.parametrize("where", ["tensor_write", "before_link_swap", "at_link_swap"])
def test_atomic_crash_mid_save_keeps_previous_prompt(tmp_path, monkeypatch, where):
    bank = PromptBank(tmp_path / "bank")
    old = _prompt(seed=1)
    bank.save(old)
    bank.save(_prompt("other", seed=9))
    names, version = bank.names(), bank.version("sentiment")
    target = {
        "tensor_write": (safetensors.torch, "save_file", _half_write),
        "before_link_swap": (os, "symlink", _killed),
        "at_link_swap": (os, "replace", _killed),
    }[where]
    with monkeypatch.context() as patch:
        patch.setattr(*target)
        with pytest.raises(_Killed):
            bank.save(_prompt(seed=2))
    assert bank.names() == names and bank.version("sentiment") == version
    _assert_same(bank.load("sentiment"), old)
    leftovers = [p for p in bank.root.rglob("*") if p.name.startswith(".tmp-")]
    if where == "tensor_write":
        assert leftovers, "a killed save leaves its temp folder behind"
    new = _prompt(seed=3)
    bank.save(new)
    _assert_same(bank.load("sentiment"), new)
    assert [p for p in bank.root.rglob("*") if p.name.startswith(".tmp-")] == []
    assert len(os.listdir(bank.root / ".versions" / "sentiment")) <= 2


def test_atomic_error_mid_save_raises_and_leaves_nothing(tmp_path, monkeypatch):
    bank = PromptBank(tmp_path / "bank")
    old = _prompt(seed=1)
    bank.save(old)

    def disk_full(path, tensor):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bank_files, "_write_tensor", disk_full)
    with pytest.raises(PromptFileError, match="could not save task 'sentiment'.*No space"):
        bank.save(_prompt(seed=2))
    _assert_same(bank.load("sentiment"), old)
    assert [p for p in bank.root.rglob("*") if p.name.startswith(".tmp-")] == []


def test_atomic_old_versions_are_cleaned(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    for seed in range(5):
        bank.save(_prompt(seed=seed))
    # The current version and the one before it (for readers mid-read) remain.
    assert len(os.listdir(bank.root / ".versions" / "sentiment")) == 2
    _assert_same(bank.load("sentiment"), _prompt(seed=4))


PNG = PNG_SIGNATURE + b"not a real image, but a PNG by its signature"


def test_roundtrip_plots_travel_with_the_prompt_in_one_atomic_save(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    saved = _prompt()
    saved.plots = {"loss": PNG + b"1", "grad_norms": PNG + b"2"}
    bank.save(saved)
    assert bank.read_plot("sentiment", "loss") == PNG + b"1"
    assert bank.read_plot("sentiment", "grad_norms") == PNG + b"2"
    assert bank.read_plot("sentiment", "validation") is None
    assert bank.read_plot("sentiment", "../adapter_config") is None  # never a path outside plots/
    files = bank.stored_files("sentiment")
    assert set(files) == {
        CONFIG_FILE,
        WEIGHTS_FILE,
        META_FILE,
        "plots/loss.png",
        "plots/grad_norms.png",
    }
    assert files["plots/loss.png"] == len(PNG) + 1
    assert files[WEIGHTS_FILE] == (bank.root / "sentiment" / WEIGHTS_FILE).stat().st_size
    _assert_same(bank.load("sentiment"), saved)  # load reads the prompt, not the images
    bank.save(_prompt(seed=1))  # a new prompt without plots does not keep the old prompt's plots
    assert bank.read_plot(
        "sentiment", "loss"
    ) is None and "plots/loss.png" not in bank.stored_files("sentiment")


def test_atomic_crash_mid_plot_write_keeps_previous_prompt_and_plots(tmp_path, monkeypatch):
    bank = PromptBank(tmp_path / "bank")
    old = _prompt(seed=1)
    old.plots = {"loss": PNG}
    bank.save(old)
    new = _prompt(seed=2)
    new.plots = {"loss": PNG + b"new"}
    with monkeypatch.context() as patch:
        patch.setattr(bank_files, "_write_bytes", _killed)
        with pytest.raises(_Killed):
            bank.save(new)
    _assert_same(bank.load("sentiment"), old)
    assert bank.read_plot("sentiment", "loss") == PNG


@pytest.mark.parametrize(
    "plots, problem",
    [({"Loss!": PNG}, "invalid plot name"), ({"loss": b"GIF89a"}, "is not a PNG image")],
)
def test_bad_input_plots_must_be_pngs_with_plain_names(tmp_path, plots, problem):
    bank = PromptBank(tmp_path / "bank")
    saved = _prompt()
    saved.plots = plots
    with pytest.raises(PromptFileError, match=problem):
        bank.save(saved)
    assert bank.names() == []


def _hammer(root: str, writer: int, rounds: int) -> None:
    torch.set_num_threads(1)
    bank = PromptBank(root)
    for i in range(rounds):
        bank.save(_prompt("shared", fill=writer, meta={"writer": writer, "round": i}))


def _assert_self_consistent(saved: SavedPrompt) -> None:
    writer = saved.meta["writer"]
    assert torch.equal(saved.embeddings, torch.full((4, 8), float(writer))), saved.meta


def test_atomic_concurrent_writers_never_mix(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    bank.save(_prompt("shared", fill=0, meta={"writer": 0, "round": 0}))
    method = "fork" if sys.platform.startswith("linux") else "spawn"  # fork: no torch re-import
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_hammer, args=(str(bank.root), w, 15)) for w in range(1, 5)]
    for proc in procs:
        proc.start()
    loads, deadline = 0, time.monotonic() + 60
    try:
        while (any(p.is_alive() for p in procs) or loads == 0) and time.monotonic() < deadline:
            _assert_self_consistent(bank.load("shared"))
            loads += 1
    finally:
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 1))
            if proc.is_alive():
                proc.terminate()
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    final = bank.load("shared")
    _assert_self_consistent(final)
    assert final.meta["writer"] in {1, 2, 3, 4} and final.meta["round"] == 14
    assert bank.names() == ["shared"]
    assert [p for p in bank.root.rglob("*") if p.name.startswith(".tmp-")] == []
    assert len(os.listdir(bank.root / ".versions" / "shared")) <= 2


# ----------------------------------------------------------------------------- killed writers


def _run_paused(target: str, when: str, flag: str, argv: list[str]) -> None:
    """Child process: make `target` ('module:attr' or 'module:Class.attr') mark `flag` and sleep
    (before or after running it), then run the real CLI command `argv`; the test SIGKILLs it."""
    from softprompt.cli import main

    module_name, _, dotted = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = dotted.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, attr)

    def paused(*args, **kwargs):
        if when == "after":
            original(*args, **kwargs)
        Path(flag).touch()
        time.sleep(600)

    setattr(owner, attr, paused)
    main(argv)


def _start_paused(target: str, when: str, argv: list[str], flag: Path):
    method = "fork" if sys.platform.startswith("linux") else "spawn"  # fork: no torch re-import
    proc = mp.get_context(method).Process(target=_run_paused, args=(target, when, str(flag), argv))
    proc.start()
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.is_alive(), f"`{' '.join(argv)}` ended without reaching {target}"
        assert time.monotonic() < deadline, f"`{' '.join(argv)}` never reached {target}"
        time.sleep(0.02)
    return proc


def _tree(*folders: Path) -> list[str]:
    return sorted(str(p) for folder in folders for p in folder.rglob("*"))


def _litter(root: Path, *others: Path) -> list[str]:
    """Temporaries, version folders no link reaches, and more versions than current + previous."""
    found = [str(p) for folder in (root, *others) for p in folder.rglob("*.tmp-*")]
    for task in _listdir_sorted(root / ".versions"):
        versions = _listdir_sorted(root / ".versions" / task)
        if not (root / task).is_symlink() or len(versions) > 2:
            found.append(f".versions/{task}: {versions}")
    return found


def _listdir_sorted(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


KILL_POINTS = {
    # operation/moment: (what pauses it, before or after running it)
    "import/writing-files": ("softprompt.bank.files:_write_tensor", "before"),
    "import/written-not-linked": ("softprompt.bank.store:PromptBank._swap_link", "before"),
    "import/link-staged": ("os:symlink", "after"),
    "import/removing-old-version": ("softprompt.bank.store:_remove_path", "before"),
    "import/over-copied-folder": ("os:symlink", "before"),
    "rm/after-commit": ("softprompt.bank.store:PromptBank._cleanup", "before"),
    "rm/removing-versions": ("softprompt.bank.store:_remove_path", "before"),
    "export/writing-files": ("softprompt.bank.files:_write_tensor", "before"),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_atomic_killed_bank_command_is_cleared_up_on_next_open(tmp_path, point):
    operation, moment = point.split("/")
    root, out = tmp_path / "bank", tmp_path / "out"
    out.mkdir()
    bank = PromptBank(root)
    other, old, new = _prompt("other", seed=9), _prompt(seed=2), _prompt(seed=3)
    bank.save(other)
    if moment == "over-copied-folder":
        (root / "sentiment").mkdir()
        write_prompt_dir(root / "sentiment", old)  # a PEFT folder copied into the bank
    else:
        bank.save(_prompt(seed=1))
        bank.save(old)
    (out / "source").mkdir()
    write_prompt_dir(out / "source", new)
    versions_before = set(_listdir_sorted(root / ".versions" / "sentiment"))
    argv = {
        "import": ["bank", "import", "--bank", str(root), str(out / "source"), "sentiment"],
        "rm": ["bank", "rm", "--bank", str(root), "sentiment"],
        "export": ["bank", "export", "--bank", str(root), "sentiment", str(out / "exported")],
    }[operation]
    proc = _start_paused(*KILL_POINTS[point], argv, tmp_path / "paused")
    try:
        mid_way = _tree(root, out)
        PromptBank(root)  # the writer is alive: nothing of it may be touched
        assert _tree(root, out) == mid_way
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert _litter(root, out), "the kill point left nothing to clear up: the test tests nothing"

    bank = PromptBank(root)  # the next open

    assert _litter(root, out) == []
    _assert_same(bank.load("other"), other)
    if operation == "rm" or moment in {"writing-files", "written-not-linked", "link-staged"}:
        expected_names = ["other"] if operation == "rm" else ["other", "sentiment"]
        assert bank.names() == expected_names
    if operation == "rm":
        assert not (root / ".versions" / "sentiment").exists()
        return
    current = os.path.basename(os.readlink(root / "sentiment"))
    assert set(_listdir_sorted(root / ".versions" / "sentiment")) <= versions_before | {current}
    _assert_same(bank.load("sentiment"), new if moment == "removing-old-version" else old)
    assert not (out / "exported").exists()


def test_atomic_version_ids_grow_even_when_the_clock_goes_back(tmp_path, monkeypatch):
    bank = PromptBank(tmp_path / "bank")
    bank.save(_prompt(seed=1))
    monkeypatch.setattr(time, "time_ns", lambda: 5)  # a writer on a host whose clock is behind
    bank.save(_prompt(seed=2))
    monkeypatch.undo()
    PromptBank(bank.root)  # an open clears up only what no reader can reach
    assert len(os.listdir(bank.root / ".versions" / "sentiment")) == 2
    _assert_same(bank.load("sentiment"), _prompt(seed=2))


# ----------------------------------------------------------------------------- bad input


def _rewrite_tensor(folder: Path, tensors: dict) -> None:
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE))


def _set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _nan(folder: Path) -> None:
    emb = torch.zeros(4, 8)
    emb[1, 2] = float("nan")
    _rewrite_tensor(folder, {"prompt_embeddings": emb})


BREAKERS = {
    "folder_missing": (lambda f: shutil.rmtree(f), PromptFileError, "does not exist"),
    "config_missing": (
        lambda f: (f / CONFIG_FILE).unlink(),
        PromptFileError,
        "adapter_config.json is missing",
    ),
    "config_not_json": (
        lambda f: (f / CONFIG_FILE).write_text("{nope"),
        PromptFileError,
        "adapter_config.json is not valid JSON",
    ),
    "config_not_prompt_tuning": (
        lambda f: _set_config(f, peft_type="LORA"),
        PromptFileError,
        "adapter_config.json: peft_type is 'LORA'",
    ),
    "config_no_token_dim": (
        lambda f: _set_config(f, token_dim=None),
        PromptFileError,
        "adapter_config.json: token_dim must be a positive integer",
    ),
    "weights_missing": (
        lambda f: (f / WEIGHTS_FILE).unlink(),
        PromptFileError,
        "adapter_model.safetensors is missing",
    ),
    "weights_unreadable": (
        lambda f: (f / WEIGHTS_FILE).write_bytes(b"garbage"),
        PromptFileError,
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    "weights_wrong_key": (
        lambda f: _rewrite_tensor(f, {"emb": torch.zeros(4, 8)}),
        PromptFileError,
        "has no tensor 'prompt_embeddings' (found: emb)",
    ),
    "tensor_not_2d": (
        lambda f: _rewrite_tensor(f, {"prompt_embeddings": torch.zeros(1, 4, 8)}),
        IncompatiblePromptError,
        "must be a 2-D tensor",
    ),
    "tensor_rows": (
        lambda f: _rewrite_tensor(f, {"prompt_embeddings": torch.zeros(5, 8)}),
        IncompatiblePromptError,
        "has 5 rows but num_virtual_tokens",
    ),
    "tensor_columns": (
        lambda f: _rewrite_tensor(f, {"prompt_embeddings": torch.zeros(4, 9)}),
        IncompatiblePromptError,
        "has 9 columns but token_dim is 8",
    ),
    "tensor_nan": (_nan, IncompatiblePromptError, "contains NaN/inf"),
    "tensor_inf": (
        lambda f: _rewrite_tensor(f, {"prompt_embeddings": torch.full((4, 8), -torch.inf)}),
        IncompatiblePromptError,
        "contains NaN/inf",
    ),
    "meta_not_json": (
        lambda f: (f / META_FILE).write_text("[1,"),
        PromptFileError,
        "softprompt.json is not valid JSON",
    ),
    "meta_nested_200000_deep": (
        lambda f: (f / META_FILE).write_text("[" * 200_000 + "]" * 200_000),
        PromptFileError,
        "softprompt.json is nested too deeply",
    ),
    "meta_nested_40_deep": (
        lambda f: (f / META_FILE).write_text('{"a": ' * 40 + "1" + "}" * 40),
        PromptFileError,
        "softprompt.json is nested deeper than 32 levels",
    ),
    "config_5000_digit_integer": (
        lambda f: (f / CONFIG_FILE).write_text('{"num_virtual_tokens": ' + "4" * 5000 + "}"),
        PromptFileError,
        "adapter_config.json is not valid JSON",
    ),
    "config_not_utf8": (
        lambda f: (f / CONFIG_FILE).write_bytes(b'{"peft_type": "\xff"}'),
        PromptFileError,
        "adapter_config.json is not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_read_prompt_dir_names_the_problem(tmp_path, case):
    folder = tmp_path / "prompt"
    folder.mkdir()
    write_prompt_dir(folder, _prompt())
    (folder / "README.md").write_text("unknown extra files are ignored")
    read_prompt_dir(folder)
    breaker, error, fragment = BREAKERS[case]
    breaker(folder)
    with pytest.raises(error) as info:
        read_prompt_dir(folder)
    assert fragment in str(info.value)


def test_bad_input_broken_task_fails_on_load_and_is_skipped_by_load_all(tmp_path, caplog):
    bank = PromptBank(tmp_path / "bank")
    bank.save(_prompt("a", seed=1))
    bank.save(_prompt("c", seed=3))
    broken = bank.root / "b"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text("{}")
    (bank.root / ".tmp-junk").mkdir()  # hidden / temp entries are not tasks
    (bank.root / "notes.txt").write_text("a file is not a task")
    (bank.root / "Bad Name").mkdir()
    os.symlink(".versions/gone/v1", bank.root / "dangling")
    assert bank.names() == ["a", "b", "c", "dangling"]
    with pytest.raises(PromptFileError, match="peft_type is None"):
        bank.load("b")
    with caplog.at_level(logging.WARNING, logger="softprompt.bank"):
        good, bad = bank.load_all()
    assert sorted(good) == ["a", "c"] and sorted(bad) == ["b", "dangling"]
    _assert_same(good["c"], _prompt("c", seed=3))
    assert "peft_type" in bad["b"] and "does not exist" in bad["dangling"]
    assert "skipping task 'b'" in caplog.text


def test_read_header_is_the_config_and_meta_a_load_gives_without_reading_the_tensor(
    tmp_path, monkeypatch
):
    bank = PromptBank(tmp_path / "bank")
    saved = _prompt(n=4, d=8)
    bank.save(saved)
    reads, read_bytes = [], Path.read_bytes
    monkeypatch.setattr(
        Path, "read_bytes", lambda path: reads.append(path.name) or read_bytes(path)
    )
    header = bank.read_header("sentiment")
    assert sorted(reads) == [CONFIG_FILE, META_FILE]
    assert (header.config, header.meta) == (saved.config, saved.meta)
    assert header.version == bank.version("sentiment") and header.saved_at > 0
    assert (header.kind, header.num_virtual_tokens, header.num_rows, header.token_dim) == (
        "soft",
        4,
        saved.num_rows,
        saved.token_dim,
    )
    check_compatible(header, token_dim=8, fingerprint=FINGERPRINT)  # checked like the prompt
    with pytest.raises(IncompatiblePromptError, match="hidden size 8 but the model has 16"):
        check_compatible(header, token_dim=16, fingerprint=FINGERPRINT)


def test_bad_input_read_header_names_the_problem(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    (bank.root / "empty").mkdir()
    broken = bank.root / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text("{}")
    os.symlink(".versions/gone/v1", bank.root / "dangling")
    with pytest.raises(PromptFileError, match="empty/adapter_config.json is missing"):
        bank.read_header("empty")
    with pytest.raises(PromptFileError, match="broken/adapter_config.json: peft_type is None"):
        bank.read_header("broken")
    with pytest.raises(PromptFileError, match="does not exist"):
        bank.read_header("dangling")
    with pytest.raises(UnknownTaskError):
        bank.read_header("absent")


def test_bad_input_load_all_checks_the_model(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    bank.save(_prompt("a"))
    bank.save(_prompt("wide", d=16))
    good, bad = bank.load_all(token_dim=8, fingerprint=FINGERPRINT)
    assert list(good) == ["a"] and "has hidden size 16 but the model has 8" in bad["wide"]
    good, bad = bank.load_all(fingerprint={**FINGERPRINT, "model_type": "gpt2"})
    assert good == {} and "another base model" in bad["a"]


INVALID_NAMES = ["../x", "A", "", "a/b", "a" * 65, ".hidden", "..", "a\n", "x/../../etc", None, 5]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_bad_input_invalid_task_names_rejected_before_disk(tmp_path, name):
    bank = PromptBank(tmp_path / "bank")
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    write_prompt_dir(peft_dir, _prompt())
    before = _dir_snapshot(tmp_path)
    saved = _prompt()
    saved.name = name
    calls = [
        lambda: validate_task_name(name),
        lambda: bank.load(name),
        lambda: bank.save(saved),
        lambda: bank.delete(name),
        lambda: bank.version(name),
        lambda: bank.import_peft(peft_dir, name),
        lambda: bank.export(name, tmp_path / "out"),
    ]
    for call in calls:
        with pytest.raises(InvalidTaskNameError):
            call()
    assert name not in bank
    assert _dir_snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["a", "0", "a" * 64, "sst2.v1_x-y"])
def test_bad_input_valid_task_names_accepted(name):
    import re

    assert validate_task_name(name) == name and re.fullmatch(TASK_NAME_PATTERN, name)


def test_bad_input_unknown_task_lists_available(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    bank.save(_prompt("b"))
    bank.save(_prompt("a"))
    for call in (bank.load, bank.version, bank.delete):
        with pytest.raises(UnknownTaskError) as info:
            call("nope")
        assert str(info.value) == f"unknown task 'nope' in bank {bank.root}; available: a, b"
    with pytest.raises(PromptFileError, match="does not exist"):
        PromptBank(tmp_path / "absent", create=False)


def test_bad_input_write_rejects_what_it_could_not_read_back(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    wrong_rows = _prompt()
    wrong_rows.embeddings = torch.zeros(3, 8)
    nan = _prompt()
    nan.embeddings[0, 0] = float("nan")
    not_json = _prompt(meta={"path": Path("x")})
    for saved, error in (
        (wrong_rows, IncompatiblePromptError),
        (nan, IncompatiblePromptError),
        (not_json, PromptFileError),
    ):
        with pytest.raises(error):
            bank.save(saved)
    assert os.listdir(bank.root) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(PromptFileError, match="not empty"):
        write_prompt_dir(tmp_path / "full", _prompt())
    bank.save(_prompt())
    with pytest.raises(PromptFileError, match="not an empty folder"):
        bank.export("sentiment", tmp_path / "full")


def test_bad_input_check_compatible_messages(caplog):
    check_compatible(_prompt(), token_dim=8, fingerprint=FINGERPRINT)
    with pytest.raises(IncompatiblePromptError) as info:
        check_compatible(_prompt("x", d=64), token_dim=576)
    assert str(info.value) == "prompt 'x' has hidden size 64 but the model has 576"
    other = {**FINGERPRINT, "vocab_sha256": "def456", "extra_field": 1}
    with pytest.raises(IncompatiblePromptError) as info:
        check_compatible(_prompt("x"), token_dim=8, fingerprint=other)
    message = str(info.value)
    assert "another base model" in message and "vocab_sha256" in message
    assert "'abc123'" in message and "'def456'" in message and "extra_field" not in message
    with caplog.at_level(logging.WARNING, logger="softprompt.bank"):
        check_compatible(_prompt("imported", meta={}), token_dim=8, fingerprint=FINGERPRINT)
    assert "no base-model fingerprint" in caplog.text


# ----------------------------------------------------------------------------- PEFT interop


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A prompt-tuning adapter saved by PEFT itself, and the tensor PEFT holds."""
    from peft import PromptTuningConfig, get_peft_model

    folder = tmp_path_factory.mktemp("peft_adapter")
    model = get_peft_model(
        _tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
    model.save_pretrained(str(folder))
    return folder, model.get_prompt_embedding_to_save("default").detach().clone()


def test_peft_interop_config_keys_match_peft(peft_adapter):
    from peft import PromptTuningConfig

    ours = peft_prompt_config(
        num_virtual_tokens=5, token_dim=32, num_layers=2, num_attention_heads=4
    )
    theirs = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        token_dim=32,
        num_layers=2,
        num_attention_heads=4,
        num_transformer_submodules=1,
    ).to_dict()
    assert ours.keys() == theirs.keys()
    assert json.loads(json.dumps(ours)) == ours  # JSON-safe
    written_by_peft = json.loads((peft_adapter[0] / CONFIG_FILE).read_text())
    assert ours.keys() == written_by_peft.keys()
    assert {k: ours[k] for k in ("peft_type", "task_type", "num_transformer_submodules")} == {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_transformer_submodules": 1,
    }


@pytest.mark.parametrize(
    ("ours", "text", "peft_value"),
    [
        ("text", "Classify:", "TEXT"),
        ("text", None, "RANDOM"),
        ("random", None, "RANDOM"),
        ("sampled_vocab", None, "SAMPLE_VOCAB"),
        ("class_labels", None, "RANDOM"),
        ("from_file", None, "RANDOM"),
        ("SAMPLE_VOCAB", None, "SAMPLE_VOCAB"),
    ],
)
def test_peft_interop_config_init_mapping(ours, text, peft_value):
    config = peft_prompt_config(
        num_virtual_tokens=2,
        token_dim=8,
        num_layers=1,
        num_attention_heads=1,
        prompt_tuning_init=ours,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path="tok",
    )
    assert config["prompt_tuning_init"] == peft_value


def test_peft_interop_config_unknown_init_rejected():
    with pytest.raises(ConfigError, match="unknown prompt_tuning_init"):
        peft_prompt_config(
            num_virtual_tokens=2,
            token_dim=8,
            num_layers=1,
            num_attention_heads=1,
            prompt_tuning_init="zeros",
        )


def test_peft_interop_config_our_folder_loads_in_peft(tmp_path):
    from peft import PeftConfig, PeftModel, PromptTuningConfig

    saved = _prompt(n=6, d=32, seed=7)
    write_prompt_dir(tmp_path, saved)
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, PromptTuningConfig)
    assert config.num_virtual_tokens == 6 and config.token_dim == 32
    model = PeftModel.from_pretrained(_tiny_llama(), str(tmp_path))
    assert torch.equal(model.get_prompt_embedding_to_save("default"), saved.embeddings)


def test_peft_interop_config_peft_adapter_reads_here(tmp_path, peft_adapter):
    from peft import PeftModel

    folder, expected = peft_adapter
    direct = read_prompt_dir(folder)
    assert torch.equal(direct.embeddings, expected) and direct.meta == {}
    assert direct.num_virtual_tokens == 5 and direct.fingerprint is None
    bank = PromptBank(tmp_path / "bank")
    imported = bank.import_peft(folder, "imported", meta={"template": "{text}"})
    loaded = bank.load("imported")
    assert torch.equal(loaded.embeddings, expected) and loaded.meta == {"template": "{text}"}
    assert imported.config == loaded.config == direct.config
    exported = bank.export("imported", tmp_path / "back")
    model = PeftModel.from_pretrained(_tiny_llama(), str(exported))
    assert torch.equal(model.get_prompt_embedding_to_save("default"), expected)
