"""Commands that load a model and run it, with or without a saved prompt: `eval` (a saved prompt or
the zero-shot baseline), `generate`, `info`."""

from __future__ import annotations

from softprompt.cli.common import load_split, print_json, task_from_flags
from softprompt.errors import ConfigError


def cmd_eval(args) -> int:
    from softprompt.bank import PromptBank
    from softprompt.data import Template
    from softprompt.model.loading import load_model
    from softprompt.prompting.kinds import model_for_saved
    from softprompt.prompting.prompted import PromptedModel
    from softprompt.training.evaluation import evaluate_task
    from softprompt.training.trainer import TrainConfig, autocast, use_bf16

    loaded = load_model(args.model)
    prompted = PromptedModel(loaded)
    task_name = None
    if args.zero_shot:
        task = task_from_flags(args, 0, args.task or "zero-shot")
        if args.hard_prompt:  # the init text as a plain-text prompt, the other usual baseline
            task.template = Template(
                args.hard_prompt.replace("{", "{{").replace("}", "}}") + " " + task.template.text
            )
    else:
        if not (args.bank and args.task):
            raise ConfigError("eval needs --bank and --task, or --zero-shot")
        saved = PromptBank(args.bank, create=False).load(args.task)  # reading makes no folder
        prompted = model_for_saved(loaded, saved, args.task)
        task = _task_from_saved(args, saved)
        task_name = args.task
    examples = load_split(args.data, task, loaded.tokenizer, 0 if task_name else -1, args)
    device = prompted.model.get_input_embeddings().weight.device
    with autocast(device, use_bf16(TrainConfig(bf16=args.bf16), device)):
        metrics = evaluate_task(prompted, task, examples, task_name, batch_size=args.batch_size)
    metrics = {
        "task": task_name,
        "zero_shot": bool(args.zero_shot),
        "template": task.template.text,
        **metrics,
    }
    if args.json:
        print_json(metrics)
    else:
        _print_eval(metrics)
    return 0


def _task_from_saved(args, saved):
    """The saved prompt's own template and verbalizer (read as the server reads them, by
    data.task_from_meta) unless flags override them."""
    from softprompt.data import Task, Template, task_from_meta
    from softprompt.errors import NoVerbalizerError

    meta = dict(saved.meta)
    if args.template:
        meta["template"] = Template.from_cli(args.template).text
    if args.labels:
        meta["verbalizer"] = {
            "labels": args.labels.split(","),
            "targets": args.targets.split(",") if args.targets else None,
        }
    if args.target_column:
        return Task(
            saved.name,
            Template(meta.get("template") or "{text}"),
            None,
            target_column=args.target_column,
        )
    try:
        task = task_from_meta(saved.name, meta)
    except NoVerbalizerError:
        raise ConfigError(
            f"prompt {saved.name!r} has no verbalizer; pass --labels or --target-column"
        ) from None
    task.label_column = args.label_column
    return task


def _print_eval(metrics: dict) -> None:
    if "accuracy" in metrics:
        print(
            f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  n={metrics['n']}"
        )
        print("confusion (rows = gold, cols = predicted):", metrics["labels"])
        for label, row in zip(metrics["labels"], metrics["confusion_matrix"], strict=True):
            print(f"  {label:>12}: {row}")
    else:
        print(
            f"exact match {metrics['exact_match']:.4f}  token F1 {metrics['token_f1']:.4f}  "
            f"loss {metrics['loss']:.4f}  n={metrics['n']}"
        )


# ---------------------------------------------------------------- generate / info


def cmd_generate(args) -> int:
    from softprompt.bank import PromptBank, read_prompt_dir
    from softprompt.model.loading import load_model
    from softprompt.prompting.kinds import model_for_saved
    from softprompt.prompting.prompted import PromptedModel

    loaded = load_model(args.model)
    prompted, task = PromptedModel(loaded), None
    if args.prompt and args.prompt.lower() != "none":
        saved = read_prompt_dir(args.prompt)
        prompted, task = model_for_saved(loaded, saved), saved.name
    elif args.bank and args.task:
        saved = PromptBank(args.bank, create=False).load(args.task)  # reading makes no folder
        prompted, task = model_for_saved(loaded, saved, args.task), args.task
    texts = [t.encode().decode("unicode_escape") if args.unescape else t for t in args.text]
    outputs = prompted.generate(
        texts,
        task,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.json:
        print_json({"task": task, "outputs": outputs})
    else:
        for text, out in zip(texts, outputs, strict=True):
            print(text + out)
    return 0


def cmd_info(args) -> int:
    from softprompt.model.loading import describe, load_model, resolve_model_source

    if args.source:
        print(resolve_model_source(args.model)[0])
        return 0
    info = describe(load_model(args.model))
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")
    return 0
