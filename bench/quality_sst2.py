"""Quality study: which settings make prompt tuning accurate on held-out sentences, and how fast.

    python bench/quality_sst2.py study --workers 8 --out runs/quality     # the whole study (GPU)
    python bench/quality_sst2.py study --workers 20 --groups lr,length,full_lr \
        --previous bench/results/quality_sst2_runs.jsonl --bf16 no        # more levers, on top of a study
    python bench/quality_sst2.py confirm --methods lora --seeds 1,2       # more seeds of a screened best
    python bench/quality_sst2.py ensemble --prompts-dirs runs/quality/prompts   # the seeds' prompts averaged
    python bench/quality_sst2.py cpu-speed                                # seconds/step here (CPU)
    python bench/quality_sst2.py report --runs runs/quality/runs.jsonl    # -> bench/results/quality_sst2.*
    QUALITY_MODEL=gemma3-270m python bench/quality_sst2.py confirm ...    # another base model

Data: SST-2 from ../shared/data (train = 55,377 phrases; validation = 1,000 whole sentences) and
AG News. Each validation file is split once (bench/common.split_validation): 300 rows choose
settings and checkpoints, the other rows are reported. Nothing reported chose anything.

Stages (each run is one spec: method + settings + seed, trained by softprompt's Trainer, except
PEFT's own prompt tuning, trained by PEFT's loop):
  screen   one seed per setting: learning rate, schedule, prompt length, init, template,
           verbalizer, batch size, data volume, LR finder, longer training; deep prompts (learning
           rate, MLP reparameterisation, how many layers carry a prefix, length); LoRA and full
           fine-tuning learning rates; PEFT prompt tuning as its docs run it.
  confirm  the best setting of each method (chosen on the 300 selection rows) with 3 seeds,
           mean +- std on the reported rows; ensembles of the 3 prompts (Lester et al. sec. 6).
  agnews   the confirmed prompt, deep prompt and LoRA settings on AG News (4 labels).
Every run validates every `eval_every` steps on both row sets, so each run leaves a learning
curve: the time-to-accuracy figure converts its steps to minutes on the 2-core CPU with the
seconds/step that `cpu-speed` measures here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SHARED,
    machine,
    sample_jsonl,
    split_validation,
    today,
    train_peft_prompt,
    write_result,
)
from quality_report import load_runs, setting, speed_key  # noqa: E402

TEMPLATES = {
    "review": "Review: {text}\nSentiment:",
    "question": "{text}\nQuestion: Is this movie review positive or negative?\nAnswer:",
    "sentence": "Sentence: {text}\nThe sentiment of this sentence is",
    "article": "Article: {text}\nTopic:",
}
VERBALIZERS = {  # name -> (labels as in the data, target strings)
    "negative_positive": (["negative", "positive"], None),
    "bad_good": (["negative", "positive"], [" bad", " good"]),
    "terrible_great": (["negative", "positive"], [" terrible", " great"]),
    "topics": (
        ["World", "Sports", "Business", "Sci/Tech"],
        [" World", " Sports", " Business", " Technology"],
    ),
}
INIT_TEXT = {
    "sst2": "Classify if this review is positive or negative:",
    "agnews": "Classify the topic of this news article as World, Sports, Business or Technology:",
}


@dataclass(frozen=True)
class Spec:
    """One training run."""

    group: str  # which lever this run measures (report sections)
    method: str = "prompt"  # prompt | deep_prompt | lora | full | peft_prompt | zero_shot
    task: str = "sst2"
    learning_rate: float = 0.1
    lr_auto: bool = False
    schedule: str = "linear"
    warmup_steps: int = 10
    steps: int = 800
    batch_size: int = 16
    num_virtual_tokens: int = 16
    init: str = "text"
    template: str = "review"
    verbalizer: str = "negative_positive"
    train_examples: int = 0  # 0 = all
    reparam_hidden: int = 0
    prefix_layers: int = 0
    seed: int = 0
    eval_every: int = 200

    @property
    def key(self) -> str:
        """The setting without group and seed: runs with the same key are seeds of one setting."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("group", "seed")}
        return json.dumps(fields, sort_keys=True)


# ---------------------------------------------------------------- the study plan


def screen_specs() -> list[Spec]:
    """One seed per setting, most important first (the deadline skips the tail)."""
    base = Spec("base")
    deep = Spec("deep_lr", method="deep_prompt", learning_rate=1e-2)
    specs = [base, replace(deep), Spec("zero_shot", method="zero_shot", steps=0)]
    specs += [replace(base, group="lr", learning_rate=lr) for lr in (0.01, 0.03, 0.3, 1.0)]
    specs += [replace(deep, learning_rate=lr) for lr in (3e-3, 3e-2, 1e-1)]
    specs += [Spec("lora_lr", method="lora", learning_rate=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    specs += [Spec("full_lr", method="full", learning_rate=lr) for lr in (1e-5, 3e-5, 1e-4)]
    specs += [Spec("peft", method="peft_prompt", learning_rate=3e-2, num_virtual_tokens=8)]
    specs += [replace(base, group="length", num_virtual_tokens=n) for n in (8, 32, 64)]
    specs += [
        replace(base, group="init", init=i) for i in ("class_labels", "sampled_vocab", "random")
    ]
    specs += [replace(base, group="schedule", schedule=s) for s in ("constant", "cosine")]
    # template and label words for the default (the deep prompt), each next to its zero-shot score
    specs += [
        Spec("zero_shot", method="zero_shot", steps=0, template=t) for t in ("question", "sentence")
    ]
    specs += [
        Spec("zero_shot", method="zero_shot", steps=0, verbalizer=v)
        for v in ("bad_good", "terrible_great")
    ]
    # each lever's alternative with the best zero-shot score on the 300 first (sentence 0.750, question
    # 0.503; bad/good 0.593, terrible/great 0.533: quality_sst2_runs.jsonl), so a deadline cuts the rest
    specs += [
        replace(deep, group="template", template="sentence"),
        replace(deep, group="verbalizer", verbalizer="bad_good"),
        replace(deep, group="template", template="question"),
        replace(deep, group="verbalizer", verbalizer="terrible_great"),
    ]
    specs += [
        replace(deep, group="deep_reparam", reparam_hidden=512, learning_rate=lr)
        for lr in (1e-3, 3e-3)
    ]
    specs += [replace(deep, group="deep_layers", prefix_layers=k) for k in (8, 15)]
    specs += [replace(deep, group="deep_length", num_virtual_tokens=n) for n in (8, 32)]
    specs += [replace(base, group="lr_auto", lr_auto=True)]
    # batch size for the default (the deep prompt): the same 12,800 examples and a validation every 3,200
    specs += [
        replace(deep, group="batch", batch_size=8, steps=1600, eval_every=400),
        replace(deep, group="batch", batch_size=32, steps=400, eval_every=100),
    ]
    # how much to label, for the default (the deep prompt): the learning curve a user decides on
    specs += [replace(deep, group="data", train_examples=n) for n in (100, 1000, 10000)]
    specs += [
        replace(deep, group="long", steps=2000, eval_every=200),
        replace(base, group="long", steps=2000, eval_every=200),
    ]
    return specs


def best_of(
    runs: list[dict], method: str, task: str = "sst2", groups: tuple[str, ...] | None = None
) -> Spec | None:
    """The setting with the highest selection accuracy among `method`'s screened runs."""
    done = [
        r
        for r in runs
        if r["spec"]["method"] == method
        and r["spec"]["task"] == task
        and "select_accuracy" in r
        and (groups is None or r["spec"]["group"] in groups)
    ]
    if not done:
        return None
    return Spec(**max(done, key=lambda r: r["select_accuracy"])["spec"])


def confirm_specs(screen: list[dict], seeds=(0, 1, 2)) -> list[Spec]:
    """The best screened setting of each method, at 3 seeds, at the default budget."""
    specs = []
    for method in ("prompt", "deep_prompt", "lora", "full", "peft_prompt"):
        best = best_of(
            screen, method, groups=None if method == "peft_prompt" else _DEFAULT_BUDGET_GROUPS
        )
        if best is not None:
            specs += [replace(best, group=f"confirm_{method}", seed=s) for s in seeds]
    specs += [Spec("confirm_zero_shot", method="zero_shot", steps=0)]
    return specs


def not_yet_run(specs: list[Spec], runs: list[dict]) -> list[Spec]:
    """`specs` less those a finished run already measured (same setting and seed, any stage: the
    screen's seed-0 run is the first seed of its confirmation)."""

    def measured(spec: Spec) -> tuple:
        return spec.method, spec.task, setting(asdict(spec)), spec.seed

    done = {measured(Spec(**r["spec"])) for r in runs if "report_accuracy" in r}
    return [s for s in specs if measured(s) not in done]


# Groups run at the default budget (800 steps x 16): the others change the budget itself.
_DEFAULT_BUDGET_GROUPS = (
    "base",
    "lr",
    "deep_lr",
    "lora_lr",
    "full_lr",
    "length",
    "init",
    "schedule",
    "template",
    "verbalizer",
    "deep_reparam",
    "deep_layers",
    "deep_length",
    "lr_auto",
)


def agnews_specs(screen: list[dict]) -> list[Spec]:
    specs = [_on_agnews(Spec("agnews_zero_shot", method="zero_shot", steps=0))]
    for method in ("prompt", "deep_prompt", "lora"):
        best = best_of(screen, method, groups=_DEFAULT_BUDGET_GROUPS)
        if best is not None:
            specs.append(_on_agnews(best, group=f"agnews_{method}"))
    return specs


def _on_agnews(spec: Spec, **changes) -> Spec:
    return replace(spec, task="agnews", template="article", verbalizer="topics", **changes)


# ---------------------------------------------------------------- one run (in a worker process)

_CACHE: dict = {}


def _model_name() -> str:
    return os.environ.get("QUALITY_MODEL", "default")


def _encoded(spec: Spec, tokenizer):
    """(task, train, selection, report) examples for the spec's data, template and verbalizer."""
    from softprompt.data import encode_example, make_classification_task

    key = (spec.task, spec.template, spec.verbalizer)
    if key not in _CACHE:
        labels, targets = VERBALIZERS[spec.verbalizer]
        task = make_classification_task(spec.task, TEMPLATES[spec.template], labels, targets)

        def encode(rows):
            return [
                encode_example(tokenizer, task, r, 0, line=i + 1, max_length=256)
                for i, r in enumerate(rows)
            ]

        train = sample_jsonl(SHARED / f"data/{spec.task}/train.jsonl", 0, seed=0)
        select, report = split_validation(spec.task)
        if os.environ.get("QUALITY_SMOKE"):  # a quick end-to-end check of the study's plumbing
            train, select, report = train[:256], select[:16], report[:16]
        _CACHE[key] = (task, encode(train), encode(select), encode(report))
    return _CACHE[key]


def _trainable(spec: Spec, loaded, task):
    """(the model the Trainer trains, its task name or None when the weights are the task)."""
    from softprompt.prompting.deep import DeepPromptModel
    from softprompt.prompting.prompted import PromptedModel
    from softprompt.prompting.soft import PromptTuningConfig
    from softprompt.training.compare import CompareConfig, build_method

    labels = task.verbalizer.labels
    config = PromptTuningConfig(
        num_virtual_tokens=spec.num_virtual_tokens,
        prompt_tuning_init=spec.init,
        prompt_tuning_init_text=INIT_TEXT[spec.task],
        init_labels=[t.strip() for t in task.verbalizer.targets],
        seed=spec.seed,
    )
    if spec.method == "prompt":
        return PromptedModel(loaded, {spec.task: config}), spec.task
    if spec.method == "deep_prompt":
        return DeepPromptModel(
            loaded,
            {spec.task: config},
            reparam_hidden=spec.reparam_hidden,
            prefix_layers=spec.prefix_layers,
        ), spec.task
    if spec.method == "zero_shot":
        return PromptedModel(loaded), None
    run = build_method(
        spec.method, loaded, CompareConfig(methods=[spec.method], seed=spec.seed), labels
    )
    return run.model, None


def _bf16() -> str:
    """The Trainer's bf16 setting for every run (auto: bf16 autocast where the device supports it)."""
    return os.environ.get("QUALITY_BF16", "auto")


def _accuracy(model, task, examples, name, device) -> float:
    from softprompt.training.evaluation import evaluate_classification
    from softprompt.training.trainer import TrainConfig, autocast, use_bf16

    with autocast(device, use_bf16(TrainConfig(bf16=_bf16()), device)):
        return evaluate_classification(model, task, examples, name, batch_size=64)["accuracy"]


def run_spec(args: tuple[dict, float, str | None]) -> dict:
    """Train and score one spec; never raises (an error is a result too)."""
    spec_dict, deadline, save_dir = args
    spec = Spec(**spec_dict)
    if time.time() > deadline:
        return {"spec": spec_dict, "skipped": "deadline"}
    try:
        return {"spec": spec_dict, **_run(spec, save_dir)}
    except Exception as exc:  # a failed setting must not stop the study
        import traceback

        return {
            "spec": spec_dict,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }


def _run(spec: Spec, save_dir: str | None) -> dict:
    import torch

    from softprompt.model.loading import load_model

    torch.manual_seed(spec.seed)
    loaded = load_model(_model_name())  # a fresh base per run: LoRA and full change it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task, train, select, report = _encoded(spec, loaded.tokenizer)
    if spec.train_examples:
        train = random.Random(spec.seed).sample(train, spec.train_examples)
    start = time.perf_counter()
    if spec.method == "peft_prompt":
        loaded.model.to(device)
        result = _run_peft(spec, loaded, task, train, select, report, device)
    else:
        result = _run_trainer(spec, loaded, task, train, select, report, device, save_dir)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    result["model"] = _model_name()
    return result


def _run_trainer(spec, loaded, task, train, select, report, device, save_dir) -> dict:
    from softprompt.training.lr_find import find_learning_rate
    from softprompt.training.trainer import EvalSet, TrainConfig, Trainer

    model, name = _trainable(spec, loaded, task)
    model.to(device)
    untrained_report = _accuracy(model, task, report, name, device)
    if spec.method == "zero_shot":
        return {
            "select_accuracy": _accuracy(model, task, select, None, device),
            "report_accuracy": untrained_report,
        }
    train = [replace(ex, task_id=0 if name else -1) for ex in train]
    config = TrainConfig(
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.schedule,
        warmup_steps=spec.warmup_steps,
        eval_steps=spec.eval_every,
        seed=spec.seed,
        eval_batch_size=64,
        bf16=_bf16(),
    )
    extra = {}
    if spec.lr_auto:
        search = find_learning_rate(model, train, config)
        config = replace(config, learning_rate=search.suggested)
        extra = {"lr_found": search.suggested, "lr_search": asdict(search)}
    curve = []

    def on_step(record: dict) -> None:
        if "validation" in record:
            curve.append(
                {
                    "step": record["step"],
                    "select": record["validation"]["metric"],
                    "report": _accuracy(model, task, report, name, device),
                }
            )
            if save_dir:  # a study cut off mid-run keeps the curve so far
                with open(Path(save_dir) / f"{run_id(spec)}.curve.jsonl", "a") as progress:
                    progress.write(
                        json.dumps({**curve[-1], "train_seconds": round(trainer.train_seconds, 1)})
                        + "\n"
                    )

    trainer = Trainer(
        model, train, config, eval_sets={name: EvalSet(task, select)}, on_step=on_step
    )
    result = trainer.train()
    if hasattr(model, "fold_reparams"):
        model.fold_reparams()
    if save_dir and name:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        save_prompt_tensor(model, name, Path(save_dir) / f"{run_id(spec)}.pt")
    untrained = trainer.untrained_validation
    curve.insert(0, {"step": 0, "select": untrained["metric"], "report": untrained_report})
    return {
        **extra,
        "select_accuracy": result.best_metric,
        "best_step": result.best_step,
        "report_accuracy": _accuracy(model, task, report, name, device),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "zero_shot_select": untrained["zero_shot"]["metric"],
        "curve": curve,
        "final_loss": result.history[-1]["loss"],
        "bf16": trainer.bf16,
        "skipped_steps": trainer.skipped_steps,
    }


def _run_peft(spec, loaded, task, train, select, report, device) -> dict:
    from softprompt.prompting.prompted import PromptedModel

    scorer = PromptedModel(loaded)  # our rank classifier scores PEFT's prompt too
    curve = []

    def on_eval(step, prompt):
        scorer.add_task("peft", prompt)
        curve.append(
            {
                "step": step,
                "select": _accuracy(scorer, task, select, "peft", device),
                "report": _accuracy(scorer, task, report, "peft", device),
            }
        )

    prompt, seconds, last_loss = train_peft_prompt(
        loaded,
        train,
        steps=spec.steps,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        num_virtual_tokens=spec.num_virtual_tokens,
        init_text=INIT_TEXT[spec.task],
        warmup_steps=spec.warmup_steps,
        seed=spec.seed,
        eval_every=spec.eval_every,
        on_eval=on_eval,
    )
    scorer.add_task("peft", prompt)
    return {
        "select_accuracy": curve[-1]["select"],
        "report_accuracy": curve[-1]["report"],
        "steps": spec.steps,
        "train_seconds": round(seconds, 2),
        "curve": curve,
        "final_loss": last_loss,
    }


def save_prompt_tensor(model, name: str, path: Path) -> None:
    import torch

    torch.save(model.table.get(name).detach().cpu().clone(), path)


def run_id(spec: Spec) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- ensembles


def ensemble_rows(runs: list[dict], prompts_dirs: list[Path]) -> list[dict]:
    """Each confirmed prompt / deep prompt setting's seeds as one ensemble (Lester et al. sec. 6):
    the saved prompts of its finished runs (the screen's seed too) in one table, label scores
    averaged in one mixed-task batch per row set."""
    import torch

    from softprompt.model.loading import load_model
    from softprompt.prompting.deep import DeepPromptModel
    from softprompt.prompting.prompted import PromptedModel

    def saved(run: dict) -> Path | None:
        return next(
            (
                d / f"{run_id(Spec(**run['spec']))}.pt"
                for d in prompts_dirs
                if (d / f"{run_id(Spec(**run['spec']))}.pt").is_file()
            ),
            None,
        )

    rows = []
    for method in ("prompt", "deep_prompt"):
        confirmed = {
            setting(r["spec"])
            for r in runs
            if r.get("stage") == "confirm"
            and r["spec"]["method"] == method
            and r["spec"]["task"] == "sst2"
            and r.get("model", "default") == _model_name()
        }
        for described in sorted(confirmed):
            seeds = [
                r
                for r in runs
                if r["spec"]["method"] == method
                and r["spec"]["task"] == "sst2"
                and setting(r["spec"]) == described
                and "report_accuracy" in r
                and saved(r)
                and r.get("model", "default") == _model_name()
            ]
            if len(seeds) < 2:
                continue
            loaded = load_model(_model_name())
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = PromptedModel(loaded) if method == "prompt" else DeepPromptModel(loaded)
            names = [f"seed{r['spec']['seed']}" for r in seeds]
            for name, run in zip(names, seeds, strict=True):
                values = torch.load(saved(run))
                model.table.add(name, values) if method == "deep_prompt" else model.add_task(
                    name, values
                )
            model.to(device)
            task, _, select, report = _encoded(Spec(**seeds[0]["spec"]), loaded.tokenizer)
            rows.append(
                {
                    "method": method,
                    "setting": described,
                    "members": names,
                    "member_devices": [r.get("device") for r in seeds],
                    "select_accuracy": _accuracy(model, task, select, names, device),
                    "report_accuracy": _accuracy(model, task, report, names, device),
                    "member_report_accuracy": [r["report_accuracy"] for r in seeds],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- driver


def run_stage(
    specs: list[Spec], workers: int, deadline: float, out: Path, prompts_dir: Path, stage: str
) -> list[dict]:
    """Run specs on a pool of worker processes (several processes share one GPU); every result
    is appended to out/runs.jsonl as it arrives, so a cut-off study keeps what it finished."""
    jobs = [(asdict(s), deadline, str(prompts_dir)) for s in specs]
    results = []
    context = multiprocessing.get_context("spawn")
    threads = max(
        1, (os.cpu_count() or 1) // workers
    )  # on a CPU, workers split the cores, not oversubscribe
    with (
        context.Pool(workers, initializer=_set_threads, initargs=(threads,)) as pool,
        open(out / "runs.jsonl", "a") as log,
    ):
        for result in pool.imap_unordered(run_spec, jobs):
            result["stage"] = stage
            results.append(result)
            log.write(json.dumps(result) + "\n")
            log.flush()
            summary = {
                k: result.get(k)
                for k in ("select_accuracy", "report_accuracy", "wall_seconds", "error", "skipped")
            }
            print(
                stage,
                result["spec"]["group"],
                result["spec"]["method"],
                json.dumps(summary),
                file=sys.stderr,
                flush=True,
            )
    return results


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def cmd_study(args) -> int:
    out, prompts_dir = Path(args.out), Path(args.prompts_dir or Path(args.out) / "prompts")
    out.mkdir(parents=True, exist_ok=True)
    prompts_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    shrink = (
        (
            lambda specs: [
                replace(
                    s, steps=min(s.steps, 4), eval_every=2, train_examples=min(s.train_examples, 64)
                )
                for s in specs
            ][: args.smoke]
        )
        if args.smoke
        else (lambda specs: specs)
    )
    if args.smoke:
        os.environ["QUALITY_SMOKE"] = "1"
    os.environ["QUALITY_BF16"] = args.bf16
    previous = load_runs(Path(args.previous)) if args.previous else []
    groups = set(args.groups.split(",")) if args.groups else None
    plan = not_yet_run([s for s in screen_specs() if groups is None or s.group in groups], previous)
    screen_deadline = start + args.budget_seconds * args.screen_share
    screen = run_stage(shrink(plan), args.workers, screen_deadline, out, prompts_dir, "screen")
    # the best settings are chosen among this screen's runs and the earlier study's
    chosen_from = [r for r in previous if r.get("stage") == "screen"] + screen
    methods = set(args.confirm_methods.split(","))
    later = [s for s in confirm_specs(chosen_from) if s.method in methods] + agnews_specs(
        chosen_from
    )
    final_deadline = start + args.budget_seconds
    confirm = run_stage(
        shrink(not_yet_run(later, previous + screen)),
        args.workers,
        final_deadline,
        out,
        prompts_dir,
        "confirm",
    )
    ensembles = ensemble_rows(previous + screen + confirm, [prompts_dir])
    (out / "ensembles.json").write_text(json.dumps(ensemble_result(ensembles), indent=2) + "\n")
    print(f"study done in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


def cmd_confirm(args) -> int:
    """The confirm stage alone, for chosen methods, from a finished screen (e.g. the GPU screen's
    runs confirmed on this CPU): the best screened setting of each method at each seed."""
    screen = [r for r in load_runs(Path(args.screen)) if r.get("stage") == "screen"]
    methods = args.methods.split(",")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    specs = [
        replace(s, eval_every=args.eval_every)
        for s in confirm_specs(screen, seeds)
        if s.method in methods
    ]
    if (
        args.task == "agnews"
    ):  # the SST-2-confirmed settings, unchanged, on AG News' template and labels
        specs = [_on_agnews(s, group=f"agnews_{s.method}") for s in specs]
    out = Path(args.out)
    os.environ["QUALITY_BF16"] = args.bf16
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    print(
        f"confirming {len(specs)} runs: {[s.method + ' seed ' + str(s.seed) for s in specs]}",
        file=sys.stderr,
    )
    if args.collect_unfinished:
        return collect_unfinished(specs, out)
    run_stage(
        specs, args.workers, time.time() + args.budget_seconds, out, out / "prompts", "confirm"
    )
    return 0


def collect_unfinished(specs: list[Spec], out: Path) -> int:
    """Runs cut off before their last step (e.g. the session ended): their learning curves so far,
    from the progress files, appended to runs.jsonl marked `stopped_at_step` (never as finished)."""
    import torch

    finished = (
        {run_id(Spec(**r["spec"])) for r in load_runs(out / "runs.jsonl")}
        if (out / "runs.jsonl").is_file()
        else set()
    )
    with open(out / "runs.jsonl", "a") as log:
        for spec in specs:
            progress = out / "prompts" / f"{run_id(spec)}.curve.jsonl"
            if run_id(spec) in finished or not progress.is_file():
                continue
            curve = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
            log.write(
                json.dumps(
                    {
                        "spec": asdict(spec),
                        "stage": "confirm",
                        "device": "cpu"
                        if not torch.cuda.is_available()
                        else torch.cuda.get_device_name(0),
                        "curve": curve,
                        "stopped_at_step": curve[-1]["step"],
                        "model": _model_name(),
                    }
                )
                + "\n"
            )
            print(
                f"{spec.method} seed {spec.seed}: stopped at step {curve[-1]['step']}",
                file=sys.stderr,
            )
    return 0


def ensemble_result(rows: list[dict]) -> dict:
    """The ensembles with what a result file states: command, machine, date and row counts."""
    return {
        "benchmark": "quality_sst2_ensembles",
        "command": "python bench/quality_sst2.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "date": today(),
        "model": _model_name(),
        "n_select": 300,
        "n_report": 700,
        "ensembles": rows,
    }


def cmd_ensemble(args) -> int:
    """Ensembles of the confirmed settings' saved prompts, from a finished study's runs file."""
    rows = ensemble_rows(
        load_runs(Path(args.runs)), [Path(d) for d in args.prompts_dirs.split(",")]
    )
    Path(args.out).write_text(json.dumps(ensemble_result(rows), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_cpu_speed(args) -> int:
    """Median seconds per training step on this machine of every setting a finished SST-2 run in
    `--runs` used (keyed by what a step's cost depends on: quality_report.speed_key), timed one
    after another in one process: the figures that turn learning curves' steps into CPU minutes."""
    import torch

    from softprompt.model.loading import load_model

    rows = {}
    for spec in timed_settings(load_runs(Path(args.runs))):
        loaded = load_model(_model_name())
        task, train, _, _ = _encoded(spec, loaded.tokenizer)
        train = random.Random(0).sample(train, args.steps * spec.batch_size)
        key = speed_key(asdict(spec))
        rows[key] = _seconds_per_step(spec, loaded, task, train, args.steps)
        print(key, rows[key], file=sys.stderr, flush=True)
    result = {
        "benchmark": "quality_sst2_cpu_speed",
        "machine": machine(),
        "date": today(),
        "command": "python bench/quality_sst2.py cpu-speed " + " ".join(sys.argv[2:]),
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "seconds_per_step": rows,
    }
    print(f"wrote {write_result('quality_sst2_cpu_speed.json', result)}", file=sys.stderr)
    return 0


def timed_settings(runs: list[dict]) -> list[Spec]:
    """One spec per step-cost setting among the finished SST-2 runs on the default model."""
    settings: dict[str, Spec] = {}
    for r in runs:
        spec = r["spec"]
        if (
            "report_accuracy" in r
            and spec["task"] == "sst2"
            and spec["method"] != "zero_shot"
            and r.get("model", "default") == "default"
        ):
            settings.setdefault(
                speed_key(spec), replace(Spec(**spec), group="cpu_speed", lr_auto=False)
            )
    return list(settings.values())


def _seconds_per_step(spec: Spec, loaded, task, train, steps: int) -> float:
    from softprompt.training.trainer import TrainConfig, Trainer

    if spec.method == "peft_prompt":
        _, seconds, _ = train_peft_prompt(
            loaded,
            train,
            steps=steps,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            num_virtual_tokens=spec.num_virtual_tokens,
            init_text=INIT_TEXT["sst2"],
        )
        return seconds / steps
    model, name = _trainable(spec, loaded, task)
    train = [replace(ex, task_id=0 if name else -1) for ex in train]
    trainer = Trainer(
        model,
        train,
        TrainConfig(
            max_steps=steps,
            per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            bf16="no",
        ),
    )
    return statistics.median(
        r["seconds"] for r in trainer.train().history[2:]
    )  # first steps warm up


def cmd_cpu_default(args) -> int:
    """`softprompt train` with its defaults (only data, template and labels given) on the whole
    SST-2 train, validating on the 300 selection sentences, tested on the other 700: the accuracy
    and training minutes a user gets on this machine."""
    import subprocess

    from common import write_jsonl

    out = Path(args.out)
    select, report = split_validation("sst2")
    select_path, report_path = (
        write_jsonl(select, out / "select.jsonl"),
        write_jsonl(report, out / "report.jsonl"),
    )
    cmd = [
        sys.executable,
        "-m",
        "softprompt",
        "train",
        "--model",
        _model_name(),
        "--task",
        "sst2",
        "--data",
        str(SHARED / "data/sst2/train.jsonl"),
        "--eval-data",
        str(select_path),
        "--test-data",
        str(report_path),
        "--template",
        TEMPLATES["review"],
        "--labels",
        "negative,positive",
        "--bank",
        str(out / "bank"),
        "--output-dir",
        str(out / "run"),
        "--seed",
        str(args.seed),
        "--json",
        *args.extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "quality_sst2_cpu_default",
        "machine": machine(),
        "date": today(),
        "command": "python bench/quality_sst2.py cpu-default " + " ".join(sys.argv[2:]),
        "train_command": " ".join(cmd),
        "seed": args.seed,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "selection_rows": len(select),
        "report_rows": len(report),
        "summary": summary,
        "metrics": [
            json.loads(line)
            for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
            if "validation" in line
        ],
    }
    name = f"quality_sst2_cpu_default_seed{args.seed}.json"
    print(f"wrote {write_result(name, result)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    study = sub.add_parser("study", help="screen, confirm (3 seeds), AG News, ensembles")
    study.add_argument(
        "--workers", type=int, default=1, help="worker processes (they share the GPU)"
    )
    study.add_argument("--out", default="runs/quality")
    study.add_argument(
        "--bf16", default="auto", choices=("auto", "no"), help="bf16 autocast for every run"
    )
    study.add_argument(
        "--prompts-dir",
        default=None,
        help="where each run's trained prompt goes (default OUT/prompts)",
    )
    study.add_argument(
        "--budget-seconds", type=float, default=3600, help="runs not started by then are skipped"
    )
    study.add_argument(
        "--screen-share", type=float, default=0.55, help="share of the budget for the screen"
    )
    study.add_argument(
        "--smoke",
        type=int,
        default=0,
        help="check the plumbing: the first N specs of each stage, 4 steps each, on a few rows",
    )
    study.add_argument(
        "--groups",
        default=None,
        help="screen only these groups (comma-separated, e.g. lr,length,full_lr); default: all",
    )
    study.add_argument(
        "--previous",
        default=None,
        help="an earlier study's runs.jsonl: its screen joins the "
        "choice of the best settings, and settings it measured are not run again",
    )
    study.add_argument(
        "--confirm-methods",
        default="prompt,deep_prompt,lora,full,peft_prompt,zero_shot",
        help="methods whose best setting is confirmed with 3 seeds",
    )
    confirm = sub.add_parser(
        "confirm", help="3 seeds of the best screened setting of chosen methods"
    )
    confirm.add_argument(
        "--screen", default="bench/results/quality_sst2_runs.jsonl", help="a study's runs.jsonl"
    )
    confirm.add_argument(
        "--methods", default="deep_prompt", help="comma-separated, e.g. deep_prompt,lora"
    )
    confirm.add_argument("--seeds", default="0,1,2")
    confirm.add_argument(
        "--task",
        default="sst2",
        choices=("sst2", "agnews"),
        help="agnews: the settings confirmed on SST-2, unchanged, on AG News (4 labels)",
    )
    confirm.add_argument(
        "--eval-every", type=int, default=100, help="validation interval (the learning curve)"
    )
    confirm.add_argument("--workers", type=int, default=1)
    confirm.add_argument("--budget-seconds", type=float, default=7 * 24 * 3600)
    confirm.add_argument("--out", default="runs/quality_confirm")
    confirm.add_argument(
        "--bf16", default="auto", choices=("auto", "no"), help="bf16 autocast for every run"
    )
    confirm.add_argument(
        "--collect-unfinished",
        action="store_true",
        help="append the curves of runs that were cut off to OUT/runs.jsonl, marked as stopped",
    )
    ensemble = sub.add_parser(
        "ensemble", help="ensembles of the confirmed prompts' seeds (their saved .pt files)"
    )
    ensemble.add_argument("--runs", default="bench/results/quality_sst2_runs.jsonl")
    ensemble.add_argument(
        "--prompts-dirs", required=True, help="comma-separated folders holding the runs' .pt files"
    )
    ensemble.add_argument("--out", default="bench/results/quality_sst2_ensembles.json")
    speed = sub.add_parser("cpu-speed", help="seconds per step here of every setting a study ran")
    speed.add_argument("--steps", type=int, default=12)
    speed.add_argument(
        "--runs", default="bench/results/quality_sst2_runs.jsonl", help="a study's runs.jsonl"
    )
    default = sub.add_parser("cpu-default", help="softprompt train with its defaults, here, timed")
    default.add_argument("--out", default="runs/quality_cpu")
    default.add_argument("--seed", type=int, default=0)
    default.add_argument("extra", nargs="*", help="extra flags for softprompt train (after --)")
    report = sub.add_parser("report", help="write bench/results/quality_sst2.{json,md,png}")
    report.add_argument("--runs", default="runs/quality/runs.jsonl")
    report.add_argument("--ensembles", default=None)
    report.add_argument("--command-line", default=None, help="the command that produced the runs")
    args = p.parse_args(argv)
    commands = {
        "study": cmd_study,
        "confirm": cmd_confirm,
        "ensemble": cmd_ensemble,
        "cpu-speed": cmd_cpu_speed,
        "cpu-default": cmd_cpu_default,
        "report": cmd_report,
    }
    return commands[args.command](args)


def cmd_report(args) -> int:
    from quality_report import write_report

    smollm_runs = [r for r in load_runs(Path(args.runs)) if r.get("model", "default") == "default"]
    not_run = [
        f"{setting(asdict(s))} ({s.method}, {s.group})"
        for s in not_yet_run(screen_specs(), smollm_runs)
    ]
    paths = write_report(
        Path(args.runs),
        Path(args.ensembles) if args.ensembles else None,
        RESULTS,
        args.command_line,
        not_run,
    )
    print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
