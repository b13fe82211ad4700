"""The training loop: one loop for every method (soft prompt, LoRA, full fine-tuning).

It trains whatever parameters of the model require grad; for prompt tuning that is only the
prompt table. It runs on `accelerate` (one process, or `accelerate launch` with several: every
process builds the same batch schedule and takes its share of each global batch; gradients are
summed across processes and the loss is normalised by the *global* token count, so N processes
compute exactly what one process computes on the same global batch). Under FSDP
(`accelerate launch --use_fsdp`) the frozen base model's decoder layers are sharded across the
processes and the prompt stays replicated (`sharding.py`); the loop is the same.

Speed levers (measured in bench/train_sst2.py): length-grouped batches, left padding so the
labelled tokens sit in the last columns and logits are computed only there, and bf16 autocast
where the hardware supports it. The prompt itself stays float32.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from softprompt.atomic import write_file
from softprompt.data import Example, Task, collate, length_grouped_batches, sample_rows
from softprompt.errors import ConfigError
from softprompt.options import opt
from softprompt.prompting.kinds import KINDS, default_learning_rate
from softprompt.training.evaluation import evaluate_task
from softprompt.training.sharding import fsdp_requested, shard_frozen_base
from softprompt.training.trackers import (
    Trackers,
    accelerator_kwargs,
    check_report_to,
    resolve_report_to,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """How to train (names follow transformers' TrainingArguments)."""

    max_steps: int = opt(800, "Number of optimizer steps.")
    per_device_train_batch_size: int = opt(16, "Examples per step on each process.")
    learning_rate: float = opt(
        default_learning_rate("deep"),
        "Peak learning rate (each prompt kind's default: "
        + "; ".join(
            f"{name} prompts: {kind.default_learning_rate:g}" for name, kind in KINDS.items()
        )
        + ").",
    )
    optimizer: str = opt("adamw", "adamw or adafactor (Lester et al. used Adafactor, lr 0.3).")
    weight_decay: float = opt(0.0, "Decoupled weight decay.")
    warmup_steps: int = opt(10, "Linear warmup steps.")
    lr_scheduler_type: str = opt("linear", "linear, cosine or constant (after warmup).")
    max_grad_norm: float = opt(1.0, "Gradient clipping threshold (0 = off).")
    eval_steps: int = opt(200, "Validate every N steps (and at step 0 and the end).")
    save_steps: int = opt(
        10,
        "Checkpoint every N steps for --resume (0 = only at validations, the time "
        "limit and the end).",
    )
    save_minutes: float = opt(
        5.0, "Also checkpoint when this many minutes passed since the last one (0 = off)."
    )
    eval_batch_size: int = opt(32, "Rows per evaluation forward.")
    max_eval_examples: int = opt(
        0,
        "Validate on at most this many examples, the same random sample "
        "at every validation (0 = all).",
    )
    early_stopping_patience: int = opt(
        0, "Stop after N validations without improvement (0 = never)."
    )
    group_by_length: bool = opt(True, "Batch examples of similar length (less padding).")
    bf16: str = opt("auto", "bf16 autocast: auto (when the CPU/GPU supports it), yes, no.")
    seed: int = opt(0, "Seed for batch order and initialisation.")
    logging_steps: int = opt(1, "Write a metrics line every N steps.")
    max_length: int = opt(
        256, "Truncate input + target to this many tokens (input cut on the left)."
    )
    vanishing_grad_norm: float = opt(1e-8, "Warn when the prompt gradient norm falls below this.")
    exploding_grad_norm: float = opt(1e3, "Warn when the prompt gradient norm exceeds this.")
    report_to: list[str] = opt(
        ["none"],
        "Experiment trackers, as in transformers: tensorboard, trackio, "
        "mlflow, wandb (local/offline, under the output dir), all (every installed one) "
        "or none.",
    )

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"optimizer must be adamw or adafactor, not {self.optimizer!r}")
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ConfigError(
                f"lr_scheduler_type must be linear, cosine or constant, not {self.lr_scheduler_type!r}"
            )
        if self.bf16 not in ("auto", "yes", "no"):
            raise ConfigError(f"bf16 must be auto, yes or no, not {self.bf16!r}")
        for name in ("max_steps", "per_device_train_batch_size", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.save_steps < 0:
            raise ConfigError("save_steps must be 0 (off) or more")
        _check_number("learning_rate", self.learning_rate, positive=True)
        if isinstance(self.report_to, str):  # transformers takes "a,b" or ["a", "b"]
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        check_report_to(self.report_to)
        for name in ("weight_decay", "max_grad_norm", "save_minutes"):
            _check_number(name, getattr(self, name))


CHANGEABLE_ON_RESUME = frozenset(
    {
        "eval_steps",
        "save_steps",
        "save_minutes",
        "eval_batch_size",
        "max_eval_examples",
        "logging_steps",
        "early_stopping_patience",
        "vanishing_grad_norm",
        "exploding_grad_norm",
        "report_to",
    }
)
"""Settings a resumed run may change: they decide what is watched and saved, not what is learned.
Any other change (learning rate, steps, batch, schedule, seed...) would make the resumed run a
different run under the old one's name, so it is refused."""


def _check_number(name: str, value: float, *, positive: bool = False) -> None:
    """A finite number, > 0 or >= 0 (the optimizers would fail later with a traceback)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ConfigError(
            f"{name} must be a finite number {'>' if positive else '>='} 0, not {value!r}"
        )


@dataclass
class EvalSet:
    """Validation data of one task."""

    task: Task
    examples: list[Example]


@dataclass
class TrainResult:
    best_metric: float | None
    best_step: int
    steps: int
    history: list[dict]
    seconds: float
    examples_per_second: float
    trainable_parameters: int


# ---------------------------------------------------------------- setup


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and on CPUs with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    return config.bf16 == "yes" or (config.bf16 == "auto" and bf16_supported(device))


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig):
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def batch_schedule(
    examples: list[Example], global_batch: int, steps: int, config: TrainConfig
) -> list[list[int]]:
    """The global batches of every step, identical on every process (a new shuffle per epoch)."""
    lengths = [ex.length for ex in examples]
    schedule: list[list[int]] = []
    epoch = 0
    while len(schedule) < steps:
        seed = config.seed + epoch
        if config.group_by_length:
            schedule += length_grouped_batches(
                lengths, global_batch, seed=seed, drop_last=len(examples) >= global_batch
            )
        else:
            order = list(range(len(examples)))
            random.Random(seed).shuffle(order)
            schedule += [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
        epoch += 1
    return schedule[:steps]


# ---------------------------------------------------------------- the loop


class Trainer:
    """Trains the parameters of `prompted` that require grad; see the module docstring."""

    def __init__(
        self,
        prompted,
        train_examples: list[Example],
        config: TrainConfig,
        *,
        eval_sets: dict[str | None, EvalSet] | None = None,
        output_dir: str | Path | None = None,
        on_step: Callable[[dict], None] | None = None,
        accelerator: Accelerator | None = None,
        run_info: dict | None = None,
    ):
        if not train_examples:
            raise ConfigError("no training examples")
        self.prompted, self.examples, self.config = prompted, train_examples, config
        self.eval_sets = eval_sets or {}
        self.output_dir = Path(output_dir) if output_dir else None
        self.on_step = on_step
        report_to = resolve_report_to(config.report_to)
        if report_to and accelerator is not None:
            raise ConfigError(
                "report_to: let the Trainer make its Accelerator (it passes log_with)"
            )
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), **accelerator_kwargs(report_to, self.output_dir)
        )
        # run_info (task, model, ...) joins the config as the trackers' hyperparameters
        self.trackers = Trackers(
            self.accelerator, report_to, self.output_dir, {**asdict(config), **(run_info or {})}
        )
        self.device = self.accelerator.device
        self.bf16 = use_bf16(config, self.device)
        self.prompted.to(self.device)
        self.sharded_layers = 0
        """Decoder layers sharded by FSDP (0: every process holds the whole model)."""
        if fsdp_requested(self.accelerator):
            self.sharded_layers = shard_frozen_base(
                self.prompted.model, self.device, self.accelerator.num_processes
            )
        self.params = [p for p in prompted.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: no parameter requires grad")
        self.optimizer = make_optimizer(self.params, config)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type
            if config.lr_scheduler_type != "constant"
            else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        world = self.accelerator.num_processes
        self.schedule = batch_schedule(
            train_examples, config.per_device_train_batch_size * world, config.max_steps, config
        )
        self.step, self.best_metric, self.best_step, self.bad_evals = 0, None, 0, 0
        self.skipped_steps = 0  # steps whose gradient was NaN/inf (not applied)
        self.best_state = self._snapshot()
        self.history: list[dict] = []
        self.untrained_validation: dict | None = None  # step 0, with the zero-shot reference
        self.train_seconds, self.examples_seen = 0.0, 0
        self._last_save = time.monotonic()
        self._log_started = False  # the first line of a fresh run starts a new metrics log

    @property
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)

    # -------------------------------------------------------- one step

    def _local_rows(self, rows: list[int]) -> list[Example]:
        acc = self.accelerator
        return [self.examples[i] for i in rows[acc.process_index :: acc.num_processes]]

    def _global_sum(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def train_step(self) -> dict:
        start = time.perf_counter()
        local = self._local_rows(self.schedule[self.step])
        pad = self.prompted.tokenizer.pad_token_id or 0
        batch = {k: v.to(self.device) for k, v in collate(local, pad, padding_side="left").items()}
        n_tokens = self._global_sum(float((batch["labels"] != -100).sum()))
        with autocast(self.device, self.bf16):
            nll = self.prompted.loss(
                batch["input_ids"],
                batch["attention_mask"],
                batch["task_ids"],
                batch["labels"],
                reduction="none",
            ).sum()
        (nll / n_tokens).backward()
        self._sync_gradients()
        stats = self._gradient_stats()
        if math.isfinite(stats["grad_norm"]):
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
        else:  # one NaN/inf step would poison the prompt and every Adam moment for good
            stats["skipped"] = True
            self.skipped_steps += 1
            log.warning(
                "step %d: non-finite gradient; update skipped (%d so far)",
                self.step + 1,
                self.skipped_steps,
            )
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.examples_seen += len(self.schedule[self.step])
        self.step += 1
        loss = self._global_sum(float(nll.detach())) / n_tokens
        return {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": seconds,
            "examples": len(self.schedule[self.step - 1]),
            **stats,
        }

    def _sync_gradients(self) -> None:
        """Sum gradients across processes (the loss is already divided by the global count)."""
        if self.accelerator.num_processes == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.accelerator.reduce(p.grad, reduction="sum")

    def _gradient_stats(self) -> dict:
        """Per-virtual-token gradient and value norms of each prompt, plus the total grad norm."""
        total = math.sqrt(
            sum(float(p.grad.float().pow(2).sum()) for p in self.params if p.grad is not None)
        )
        stats: dict = {"grad_norm": total}
        table = getattr(self.prompted, "table", None)
        if table is not None and any(p.requires_grad for p in table.parameters()):
            stats["prompt_grad_norms"] = {
                name: (p.grad.norm(dim=-1).tolist() if p.grad is not None else [0.0] * p.shape[0])
                for name, p in zip(table.names, table.prompts, strict=True)
            }
            stats["prompt_norms"] = {
                name: p.detach().norm(dim=-1).tolist()
                for name, p in zip(table.names, table.prompts, strict=True)
            }
        if math.isfinite(total) and total > self.config.exploding_grad_norm:
            log.warning(
                "step %d: exploding gradient (norm %.3g); lower --learning-rate",
                self.step + 1,
                total,
            )
        elif total < self.config.vanishing_grad_norm:
            log.warning("step %d: vanishing gradient (norm %.3g)", self.step + 1, total)
        return stats

    # -------------------------------------------------------- validation

    def validate(self, *, task_names: bool = True) -> dict:
        """Metric per task (accuracy for labelled tasks, negative loss otherwise) and their mean.

        `task_names=False` scores the same rows with no prompt (the zero-shot reference)."""
        results = {}
        for name, eval_set in self.eval_sets.items():
            # the same rows at every validation, whatever the training seed
            examples = sample_rows(eval_set.examples, self.config.max_eval_examples, seed=0)
            with autocast(self.device, self.bf16):
                results[name or "base"] = evaluate_task(
                    self.prompted,
                    eval_set.task,
                    examples,
                    name if task_names else None,
                    batch_size=self.config.eval_batch_size,
                )
        scores = [r["accuracy"] if "accuracy" in r else -r["loss"] for r in results.values()]
        return {"metric": sum(scores) / len(scores) if scores else None, "tasks": results}

    def _after_validation(self, metric: float | None) -> bool:
        """Keep the best state; True when early stopping says stop."""
        if metric is None or self.best_metric is None or metric > self.best_metric:
            self.best_metric, self.best_step, self.bad_evals = metric, self.step, 0
            self.best_state = self._snapshot()
            return False
        self.bad_evals += 1
        patience = self.config.early_stopping_patience
        return bool(patience and self.bad_evals >= patience)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore_best(self) -> None:
        with torch.no_grad():
            for p, best in zip(self.params, self.best_state, strict=True):
                p.copy_(best)

    # -------------------------------------------------------- run

    def train(self) -> TrainResult:
        start_step = self.step
        try:
            self._loop()
        finally:
            self.trackers.finish()
        self.restore_best()
        log.info(
            "trained %d steps (%d this run); best metric %s at step %d",
            self.step,
            self.step - start_step,
            self.best_metric,
            self.best_step,
        )
        return TrainResult(
            self.best_metric,
            self.best_step,
            self.step,
            self.history,
            self.train_seconds,
            self.examples_seen / self.train_seconds if self.train_seconds else 0.0,
            self.trainable_parameter_count,
        )

    def _loop(self) -> None:
        if self.step == 0 and self.eval_sets:
            self._validate_untrained()
        stop = False
        while self.step < self.config.max_steps and not stop:
            record = self.train_step()
            if self.step % self.config.eval_steps == 0 or self.step == self.config.max_steps:
                validation = self.validate() if self.eval_sets else {"metric": None}
                record["validation"] = validation
                stop = self._after_validation(validation["metric"])
            self._log(record)  # before the checkpoint: the log never lacks a step a resume skips
            if "validation" in record or self._checkpoint_due():
                self.save_checkpoint()

    def _validate_untrained(self) -> None:
        """Step 0: the untrained prompt's validation and the plain model's (zero-shot), so the
        curve shows whether training first made things worse, and against what."""
        validation = self.validate()
        validation["zero_shot"] = self.validate(task_names=False)
        self.untrained_validation = (
            validation  # logged only: best-prompt selection starts at step 1
        )
        self._write_metrics({"step": 0, "validation": validation})

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.on_step:
            self.on_step(record)
        if self.step % self.config.logging_steps == 0 or "validation" in record:
            self._write_metrics(record)

    def _write_metrics(self, record: dict) -> None:
        if self.output_dir and self.accelerator.is_main_process:
            if not self._log_started:
                self._start_fresh_run()
            with open(self._metrics_path(), "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.add(record)  # logged once a checkpoint covers it (see save_checkpoint)

    # -------------------------------------------------------- checkpoints (--resume)

    def checkpoint_path(self) -> Path | None:
        return self.output_dir / "checkpoint.pt" if self.output_dir else None

    def _metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _checkpoint_due(self) -> bool:
        """--save-steps, or --save-minutes since the last checkpoint."""
        every = self.config.save_steps
        minutes = self.config.save_minutes
        return bool(every and self.step % every == 0) or bool(
            minutes and time.monotonic() - self._last_save >= minutes * 60
        )

    def save_checkpoint(self) -> None:
        """Everything needed to continue bit-for-bit: written to a temp file, fsynced, renamed."""
        self._last_save = time.monotonic()
        path = self.checkpoint_path()
        if path is None or not self.accelerator.is_main_process:
            return
        state = {
            "step": self.step,
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "best_state": [t.cpu() for t in self.best_state],
            "train_seconds": self.train_seconds,
            "examples_seen": self.examples_seen,
            "config": asdict(self.config),
            "trackers": self.trackers.run_ids(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, lambda f: torch.save(state, f))
        # only now: a tracker never holds a step that a --resume from this checkpoint logs again
        self.trackers.flush()

    def load_checkpoint(self) -> bool:
        """Continue from the last checkpoint in output_dir, and cut the metrics log to match it.

        Without a checkpoint (killed before the first) the run starts over from step 0, and the
        log is emptied, so no step is ever logged twice. False when there was no checkpoint.
        """
        path = self.checkpoint_path()
        if path is None:
            return False
        found = path.is_file()
        if found:
            self._restore(self._read_checkpoint(path))
            log.info("resumed from %s at step %d", path, self.step)
        if self.accelerator.is_main_process:
            self._rewrite_metrics_log()
        self._log_started = True
        return found

    def _read_checkpoint(self, path: Path) -> dict:
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # torn by a disk failure, or not ours: torch raises many types
            raise ConfigError(
                f"checkpoint {path} cannot be read ({exc}); delete it to start over"
            ) from None
        changed = {
            k: (v, getattr(self.config, k))
            for k, v in state.get("config", {}).items()
            if k in asdict(self.config) and getattr(self.config, k) != v
        }
        refused = {k: values for k, values in changed.items() if k not in CHANGEABLE_ON_RESUME}
        if refused:
            detail = ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(refused.items())
            )
            raise ConfigError(
                f"checkpoint {path} was made with other settings ({detail}): resume with the "
                "checkpoint's settings, or train into a new --output-dir"
            )
        if changed:
            log.warning(
                "resuming with settings changed since the checkpoint: %s",
                ", ".join(sorted(changed)),
            )
        return state

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best_metric = state["step"], state["best_metric"]
        self.best_step, self.bad_evals = state["best_step"], state["bad_evals"]
        self.best_state = [t.to(self.device) for t in state["best_state"]]
        self.train_seconds, self.examples_seen = state["train_seconds"], state["examples_seen"]
        self.trackers.resume(state.get("trackers"), self.step)

    def _rewrite_metrics_log(self) -> None:
        """Keep the lines up to the resumed step (atomically); a torn line (a write cut by a
        crash or power loss) is dropped, never fatal."""
        metrics = self._metrics_path()
        if not metrics.is_file():
            return
        last = (
            self.step if self.step > 0 else -1
        )  # a run (re)started at step 0 logs its step 0 again
        kept, torn = [], 0
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            record = _parse_record(line)
            if record is None:
                torn += line.strip() != ""
            elif record["step"] <= last:
                kept.append(line + "\n")
        if torn:
            log.warning("dropped %d unreadable line(s) of %s (a write cut short)", torn, metrics)
        write_file(metrics, "".join(kept))

    def _start_fresh_run(self) -> None:
        """A run that did not resume starts a new metrics log, and drops a checkpoint left by an
        earlier run in the same folder (a later --resume must not continue that one)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_file(self._metrics_path(), "")
        self.checkpoint_path().unlink(missing_ok=True)
        self._log_started = True


def _parse_record(line: str) -> dict | None:
    """A metrics line, or None for one that is not a complete record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def train_prompts(
    prompted,
    data: str,
    *,
    task: str,
    template: str,
    labels: list[str] | None = None,
    targets: list[str] | None = None,
    eval_data: str | None = None,
    output_dir=None,
    **config,
) -> TrainResult:
    """Notebook-sized entry point: train `task`'s prompt on a data file (or builtin:NAME:SPLIT).

    Keyword arguments are TrainConfig fields. The task's template and verbalizer are remembered
    by `prompted`, so `prompted.save_task(task, bank)` stores them with the prompt.
    """
    from softprompt.data import Task, Template, Verbalizer, load_examples

    verbalizer = Verbalizer(labels, targets) if labels else None
    spec = Task(task, Template(template), verbalizer, target_column=None if labels else "target")
    task_id = prompted.table.index(task)
    train_config = TrainConfig(**config)
    examples, _ = load_examples(
        data, spec, prompted.tokenizer, task_id, max_length=train_config.max_length
    )
    eval_sets = {}
    if eval_data:
        eval_examples, _ = load_examples(
            eval_data, spec, prompted.tokenizer, task_id, max_length=train_config.max_length
        )
        eval_sets[task] = EvalSet(spec, eval_examples)
    prompted.meta[task] = {
        "template": spec.template.text,
        "verbalizer": verbalizer.to_dict() if verbalizer else None,
    }
    return Trainer(
        prompted, examples, train_config, eval_sets=eval_sets, output_dir=output_dir
    ).train()
