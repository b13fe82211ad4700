"""Serving latency: time to first token with and without the KV prefix cache, and how long it
takes to make a task servable.

Time to first token (TTFT) is `Engine.generate` with max_new_tokens=1 (tokenise, prefill, pick),
the same request with the task's KV prefix cached (`use_prefix_cache=True`, prefix warm) and
with the soft prompt injected as embeddings (`use_prefix_cache=False`), for batch sizes 1 and 8.

Activation, i.e. switching the model to serve another task:
  ours in memory   `Engine.activate` of an active task (a bank version check)
  ours from disk   `Engine.activate` after `deactivate` (read + validate the prompt folder)
  ours prefix      computing a task's KV prefix once (paid by its first request)
  peft prompt      `PeftModel.load_adapter` of a prompt-tuning folder + `set_adapter`
  peft lora        `PeftModel.load_adapter` of a LoRA folder (r=8, q/k/v/o) + `set_adapter`
  full model       `AutoModelForCausalLM.from_pretrained` of the cached safetensors folder

    python bench/serve_latency.py --model default
    python bench/serve_latency.py --model default --num-virtual-tokens 32 100 --repeats 50

Prints a JSON summary and writes it to bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from softprompt.bank import PromptBank, SavedPrompt
from softprompt.model.loading import load_model, resolve_model_source
from softprompt.prompting import inject
from softprompt.prompting.soft import PromptTuningConfig, init_prompt
from softprompt.serving.engine import Engine, GenerationRequest

TEXT = "Review: the plot was slow but the acting and the music were lovely\nSentiment:"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="default", help="Model name for load_model (default: %(default)s)."
    )
    parser.add_argument(
        "--num-virtual-tokens",
        type=int,
        nargs="+",
        default=[32],
        help="Soft prompt lengths to measure TTFT for (default: 32).",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8],
        help="TTFT batch sizes (default: 1 8).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="Timed runs per TTFT setting (default: %(default)s).",
    )
    parser.add_argument(
        "--activation-repeats",
        type=int,
        default=20,
        help="Timed activations per kind (full model loads: a quarter of it, at least 2).",
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "serve_latency.json")
    )
    return parser.parse_args(argv)


def stats_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "median_ms": round(statistics.median(ms), 4),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 4),
        "min_ms": round(ms[0], 4),
        "runs": len(ms),
    }


def timings(fn, repeats: int, setup=None) -> list[float]:
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def save_prompt(bank: PromptBank, loaded, name: str, values: torch.Tensor) -> None:
    cfg = loaded.model.config
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": values.shape[0],
        "token_dim": values.shape[1],
        "num_transformer_submodules": 1,
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
    }
    bank.save(SavedPrompt(name, values, config, {"fingerprint": loaded.fingerprint}))


def prompt_values(loaded, n: int, seed: int = 0) -> torch.Tensor:
    config = PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init="sampled_vocab", seed=seed)
    return init_prompt(config, loaded.model, loaded.tokenizer)


# ---------------------------------------------------------------- time to first token


def ttft(loaded, bank: PromptBank, args) -> dict:
    cached = Engine(loaded, bank, use_prefix_cache=True)
    injected = Engine(loaded, bank, use_prefix_cache=False)
    out = {}
    for n in args.num_virtual_tokens:
        save_prompt(bank, loaded, f"ttft-{n}", prompt_values(loaded, n))
        for batch in args.batch_sizes:
            requests = [GenerationRequest(TEXT, task=f"ttft-{n}", max_new_tokens=1)] * batch
            row = {}
            for name, engine in (("prefix_cache", cached), ("no_cache", injected)):
                engine.generate(requests)  # warm: loads the task and (cached) its KV prefix
                row[name] = stats_ms(
                    timings(lambda e=engine, r=requests: e.generate(r), args.repeats)
                )
            row["speedup"] = round(
                row["no_cache"]["median_ms"] / row["prefix_cache"]["median_ms"], 3
            )
            out[f"virtual_{n}_batch_{batch}"] = row
            print(
                f"  TTFT n={n} batch={batch}: cache {row['prefix_cache']['median_ms']:.1f} ms, "
                f"no cache {row['no_cache']['median_ms']:.1f} ms",
                file=sys.stderr,
            )
    return out


# ---------------------------------------------------------------- activation


def ours_activation(loaded, bank: PromptBank, args) -> dict:
    values = prompt_values(loaded, max(args.num_virtual_tokens), seed=1)
    save_prompt(bank, loaded, "switch", values)
    engine = Engine(loaded, bank)
    engine.activate("switch")
    repeats = args.activation_repeats
    memory = timings(lambda: engine.activate("switch"), repeats * 10)
    disk = timings(
        lambda: engine.activate("switch"), repeats, setup=lambda: engine.deactivate("switch")
    )
    prefix = timings(lambda: inject.prompt_prefix(loaded.model, values), repeats)
    return {
        "ours_in_memory": stats_ms(memory),
        "ours_from_disk": stats_ms(disk),
        "ours_prefix_compute": stats_ms(prefix),
    }


def peft_activation(loaded, source: str, bank: PromptBank, args) -> dict:
    """PEFT adapters loaded into a second copy of the model (LoRA changes the model in place)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    repeats = args.activation_repeats
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-lora-") as tmp:
        lora_dir = Path(tmp) / "lora"
        lora_model = AutoModelForCausalLM.from_pretrained(source)
        lora = get_peft_model(
            lora_model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            ),
        )
        lora.save_pretrained(lora_dir)
        lora = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(source), lora_dir, adapter_name="base"
        )
        lora_times = _load_adapters(lora, lora_dir, repeats)
        prompt_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(source), bank.root / "switch", adapter_name="base"
        )
        prompt_times = _load_adapters(prompt_model, bank.root / "switch", repeats)
    return {
        "peft_prompt_load_adapter": stats_ms(prompt_times),
        "peft_lora_load_adapter": stats_ms(lora_times),
    }


def _load_adapters(peft_model, folder: Path, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        name = f"a{i}"
        start = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=name)
        peft_model.set_adapter(name)
        out.append(time.perf_counter() - start)
        peft_model.set_adapter("base")
        peft_model.delete_adapter(name)
    return out


def full_model_load(source: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    return {
        "full_model_from_pretrained": stats_ms(
            timings(
                lambda: AutoModelForCausalLM.from_pretrained(source),
                max(2, args.activation_repeats // 4),
            )
        )
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    loaded = load_model(args.model)
    source, _ = resolve_model_source(args.model)
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-bank-") as bank_dir:
        bank = PromptBank(bank_dir)
        results = {"ttft": ttft(loaded, bank, args)}
        activation = ours_activation(loaded, bank, args)
        activation |= peft_activation(loaded, source, bank, args)
        activation |= full_model_load(source, args)
    memory = activation["ours_in_memory"]["median_ms"]
    activation["disk_over_memory"] = round(activation["ours_from_disk"]["median_ms"] / memory, 1)
    activation["peft_lora_over_ours_disk"] = round(
        activation["peft_lora_load_adapter"]["median_ms"]
        / activation["ours_from_disk"]["median_ms"],
        2,
    )
    results["activation"] = activation
    for name, row in activation.items():
        if isinstance(row, dict):
            print(f"  activation {name:28s} {row['median_ms']:10.3f} ms", file=sys.stderr)
    summary = {
        "benchmark": "serve_latency",
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {
            "name": args.model,
            "base": loaded.model.config.name_or_path,
            "source": source,
            "dtype": str(loaded.model.dtype),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
