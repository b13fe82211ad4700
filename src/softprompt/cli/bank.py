"""`softprompt bank list|show|rm|import|export` and `softprompt inspect` (what saved prompts mean)."""

from __future__ import annotations

from pathlib import Path

from softprompt.cli.common import print_json


def cmd_bank(args) -> int:
    from softprompt.bank import PromptBank

    bank = PromptBank(args.bank, create=args.bank_command == "import")
    if args.bank_command == "list":
        _list_tasks(bank, args.model)
    elif args.bank_command == "show":
        saved = bank.load(args.name)
        print_json(
            {
                "name": saved.name,
                "shape": list(saved.embeddings.shape),
                "config": saved.config,
                "meta": saved.meta,
                "path": str(Path(bank.root) / saved.name),
            }
        )
    elif args.bank_command == "rm":
        bank.delete(args.name)
        print(f"removed {args.name}")
    elif args.bank_command == "import":
        saved = bank.import_peft(args.source, args.name)
        print(f"imported {saved.name}: {saved.num_virtual_tokens} x {saved.token_dim}")
    elif args.bank_command == "export":
        bank.export(args.name, args.dest)
        print(f"exported {args.name} to {args.dest}")
    return 0


def _list_tasks(bank, model_name: str) -> None:
    """One line per task: `ok`, `BROKEN: why` (its files cannot be read) or `UNUSABLE with model
    'M': why` (readable, but not for this model), by the check the server's engine makes when it
    loads a task, so the list says what `serve --model` would do with each."""
    from softprompt.errors import IncompatiblePromptError, InvalidTaskNameError, UnknownTaskError
    from softprompt.model.loading import load_model
    from softprompt.serving.engine import Engine

    engine = Engine(load_model(model_name), bank)
    model = engine.model.config.name_or_path or model_name  # as saved prompts name their model
    for name in bank.names():
        try:
            info = engine.activate(name)
        except UnknownTaskError:
            continue  # removed while we listed
        except (IncompatiblePromptError, InvalidTaskNameError) as exc:
            status = f"UNUSABLE with model {model!r}: {exc}"
        except Exception as exc:  # one broken entry must never hide the others
            status = f"BROKEN: {exc}"
        else:
            unverified = info.meta.get("fingerprint") is None  # e.g. a PEFT import
            status = "ok (no base-model fingerprint: not verified)" if unverified else "ok"
        print(f"{name}\t{status}")


def cmd_inspect(args) -> int:
    from softprompt.bank import PromptBank
    from softprompt.model.loading import load_model
    from softprompt.prompting.inspection import inspect_prompts

    loaded = load_model(args.model)
    bank = PromptBank(args.bank, create=False)
    names = args.task or bank.names()
    prompts = {}
    for name in names:
        saved = bank.load(name)
        prompts[name] = saved.embeddings
    report = inspect_prompts(loaded.model, loaded.tokenizer, prompts, k=args.top_k)
    if args.json:
        print_json(report)
        return 0
    print(
        f"real token embedding norms: mean {report['embedding_norms']['mean']}, "
        f"std {report['embedding_norms']['std']}"
    )
    for name, info in report["tasks"].items():
        print(f"{name} {info['shape']}:")
        for i, (norm, near) in enumerate(zip(info["norms"], info["nearest_tokens"], strict=True)):
            words = ", ".join(f"{tok!r} {sim:.2f}" for tok, sim in near)
            print(f"  v{i:<3} norm {norm:8.3f}  nearest: {words}")
    for a, row in report["similarity"].items():
        print(f"similarity {a}: " + ", ".join(f"{b} {v:.3f}" for b, v in row.items()))
    return 0
