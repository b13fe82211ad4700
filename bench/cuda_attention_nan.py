"""Where bf16 prompt training goes NaN on a GPU, and whether `inject.run_model`'s kernel choice (no
cuDNN attention) stops it. Needs CUDA and the study's data and model (see bench/quality_sst2.py).

    OUT=runs/nan python bench/cuda_attention_nan.py unguarded 250 &   # cuDNN allowed: before the fix
    OUT=runs/nan python bench/cuda_attention_nan.py guarded 250       # the shipped code
    (fp32: cuDNN allowed, no autocast)

A 32-token prompt, lr 0.1, batch 16, seed 0 (it collapsed first in the H200 screen). Every step
records whether its loss or gradient was non-finite (the Trainer then skips the update) and the
batch's padded width; the first such batch is run again under autograd's anomaly detection, which
names the operation that produced the NaN. Every 25 steps: accuracy on 64 selection rows, whether
the prompt is finite, and whether the frozen weights changed. Writes OUT/diag_<variant>.json."""

import json
import math
import os
import sys
import time
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, "bench")
import quality_sst2 as q

from softprompt.data import collate
from softprompt.model.loading import load_model
from softprompt.prompting import inject
from softprompt.training.trainer import EvalSet, TrainConfig, Trainer, autocast

variant, steps = sys.argv[1], int(sys.argv[2])
if variant != "guarded":
    inject._ATTENTION_BACKENDS[:] = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
tokens = int(os.environ.get("DIAG_TOKENS", 32))
spec = q.Spec("diag", num_virtual_tokens=tokens, steps=steps, eval_every=steps // 2)
torch.manual_seed(0)
loaded = load_model(q._model_name())
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
task, train, select, report = q._encoded(spec, loaded.tokenizer)
model, name = q._trainable(spec, loaded, task)
model.to(device)
train = [replace(ex, task_id=0) for ex in train]
config = TrainConfig(
    max_steps=steps,
    per_device_train_batch_size=16,
    learning_rate=0.1,
    warmup_steps=10,
    eval_steps=steps // 2,
    seed=0,
    eval_batch_size=64,
    bf16="no" if variant == "fp32" else "auto",
)
frozen = [p for p in model.parameters() if not p.requires_grad]
base_sum = lambda: float(sum(p.detach().double().sum() for p in frozen))  # noqa: E731
base0 = base_sum()
out = {
    "variant": variant,
    "tokens": tokens,
    "events": [],
    "probes": [],
    "widths_64_mod_128": 0,
    "anomaly": None,
}
trainer = None


def state():
    params_finite = all(bool(torch.isfinite(p).all()) for p in trainer.params)
    return {
        "params_finite": params_finite,
        "param_max": max(float(p.detach().abs().max()) for p in trainer.params),
        "base_changed": base_sum() != base0,
    }


def anomaly_op(rows):
    pad = loaded.tokenizer.pad_token_id or 0
    batch = {k: v.to(device) for k, v in collate(rows, pad, padding_side="left").items()}
    try:
        with torch.autograd.detect_anomaly(check_nan=True):
            with autocast(device, trainer.bf16):
                nll = model.loss(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["task_ids"],
                    batch["labels"],
                    reduction="none",
                ).sum()
            nll.backward()
        return "no anomaly on rerun"
    except RuntimeError as exc:
        return str(exc)[:400]
    finally:
        for p in trainer.params:
            p.grad = None


def on_step(record):
    step = record["step"]
    rows = [trainer.examples[i] for i in trainer.schedule[step - 1]]
    width = max(ex.length for ex in rows) + tokens
    out["widths_64_mod_128"] += width % 128 == 64
    bad = record.get("skipped") or not math.isfinite(record["loss"])
    if bad and len(out["events"]) < 12:
        out["events"].append(
            {
                "step": step,
                "width": width,
                "loss": record["loss"],
                "skipped": bool(record.get("skipped")),
                **state(),
            }
        )
        if out["anomaly"] is None:
            out["anomaly"] = {"step": step, "width": width, "message": anomaly_op(rows)}
    if step % 25 == 0 or "validation" in record:
        out["probes"].append(
            {
                "step": step,
                "canary_acc": round(q._accuracy(model, task, select[:64], name, device), 3),
                "loss": record["loss"],
                **state(),
            }
        )


trainer = Trainer(model, train, config, eval_sets={name: EvalSet(task, select)}, on_step=on_step)
start = time.perf_counter()
result = trainer.train()
out.update(
    seconds=round(time.perf_counter() - start, 1),
    skipped_steps=trainer.skipped_steps,
    best_select=result.best_metric,
    best_step=result.best_step,
    curve=[(h["step"], h["validation"]["metric"]) for h in result.history if "validation" in h],
)
text = json.dumps(out)
print(text, flush=True)
open(os.path.join(os.environ.get("OUT", "/tmp"), f"diag_{variant}.json"), "w").write(text)
