"""The web console: a page at `/` (plain HTML, CSS and JS shipped in `softprompt/api/static/`) and the
JSON routes it reads besides the OpenAI ones.

    GET /                                   the page (assets under /console/)
    GET /v1/tasks?limit=&after=             the served tasks with what the bank knows of them, a page
                                            at a time (OpenAI's list style: has_more, last_id)
    GET /v1/tasks/{task}                    one task
    GET /v1/tasks/{task}/plots/{plot}.png   a training plot saved with the prompt (loss, validation, ...)
    GET /v1/compare?a=T1&b=T2&k=5           two prompts side by side (`inspect`: similarity, nearest tokens)

The page uses only the server's HTTP API (these routes, `/v1/models`, `/v1/classify`,
`/v1/completions` and the admin routes), so it works the same on every backend. A task the caller
may not see (`visible` says; default: all) answers 404 exactly like a missing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response
from starlette.exceptions import HTTPException

from softprompt.api.schemas import ListPage, list_page
from softprompt.data import task_from_meta, template_from_meta
from softprompt.errors import ConfigError, SoftPromptError, UnknownTaskError
from softprompt.prompting.inspection import embedding_norm_stats, nearest_tokens, task_similarity
from softprompt.serving.processor import InputProcessor
from softprompt.serving.registry import TaskInfo, unknown_task

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
PATH_SETTINGS = ("data", "eval_data", "test_data", "output_dir")
"""Training settings that name files on the training machine: not shown to the console's users."""
MAX_TOP_K = 20

TaskFilter = Callable[[Request, str], bool]


def add_console_routes(app: FastAPI, backend, visible: TaskFilter | None = None) -> None:
    """Serve the page and its JSON routes for `backend` (the built-in engine or the vLLM gateway)."""
    processor: InputProcessor = backend.processor
    visible = visible or (lambda request, task: True)

    def served(request: Request, task: str) -> TaskInfo:
        if not visible(request, task):
            raise unknown_task(task)
        try:
            return processor.activate(task)
        except UnknownTaskError:
            raise unknown_task(task) from None

    @app.get("/", include_in_schema=False)
    async def page():
        return _asset("index.html")

    @app.get("/console/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS or name == "index.html":
            raise HTTPException(404, f"no console file {name!r}")
        return _asset(name)

    @app.get("/v1/tasks")
    async def tasks(request: Request, page: Annotated[ListPage, Depends(list_page)]):
        """A page of tasks by name, from their metadata (no prompt is read); `unavailable` names
        the bank's tasks on this page that cannot be served, and why."""

        def read() -> tuple[list[dict], dict[str, str], bool]:
            listed = page.read(processor, lambda name: visible(request, name))
            data = [task_details(processor, info) for info in listed.infos]
            return data, listed.unavailable, listed.has_more

        data, errors, has_more = await asyncio.to_thread(read)
        return {
            **ListPage.body(data, has_more),
            "model": processor.base_model_id,
            "backend": backend.name,
            "prompt_kinds": list(processor.kinds),
            "unavailable": [
                {"id": name, "reason": reason} for name, reason in sorted(errors.items())
            ],
        }

    @app.get("/v1/tasks/{task}")
    async def task(task: str, request: Request):
        info = await asyncio.to_thread(served, request, task)
        return await asyncio.to_thread(task_details, processor, info)

    @app.get("/v1/tasks/{task}/plots/{plot}.png")
    async def plot(task: str, plot: str, request: Request):
        await asyncio.to_thread(served, request, task)
        try:
            png = (
                None
                if processor.bank is None
                else await asyncio.to_thread(processor.bank.read_plot, task, plot)
            )
        except UnknownTaskError:  # deleted meanwhile (the bank's message names its folder)
            raise unknown_task(task) from None
        if png is None:
            raise HTTPException(404, f"task '{task}' has no plot '{plot}'")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/compare")
    async def compare(
        request: Request,
        a: str = Query(description="A task."),
        b: str = Query(description="Another task (or the same)."),
        k: int = Query(5, ge=1, le=MAX_TOP_K, description="Nearest tokens per virtual token."),
    ):
        infos = [await asyncio.to_thread(served, request, name) for name in (a, b)]
        return await asyncio.to_thread(compare_prompts, processor, infos, k)


def task_details(processor: InputProcessor, info: TaskInfo) -> dict:
    """What the console shows of one task: its kind and size, and what its softprompt.json says
    (template and its fields, labels, base model, metrics, training settings), plus its plots."""
    meta = info.meta
    files = _stored_files(processor, info)
    return {
        "id": info.name,
        "kind": info.kind,
        "num_virtual_tokens": info.num_virtual_tokens,
        "version": info.version,
        "classify": info.has_verbalizer,
        "size_bytes": sum(files.values()) if files else None,
        "files": files,
        "base_model": meta.get("base_model"),
        "created": meta.get("created"),
        **_template_and_labels(info.name, meta),
        "metrics": meta.get("metrics") if isinstance(meta.get("metrics"), dict) else None,
        "training": _training_settings(meta.get("training")),
        "plots": sorted(
            path[len("plots/") : -len(".png")]
            for path in files
            if path.startswith("plots/") and path.endswith(".png")
        ),
    }


def compare_prompts(processor: InputProcessor, infos: list[TaskInfo], k: int) -> dict:
    """Two tasks' prompts as `softprompt inspect` reports them: cosine similarity of the mean-pooled
    prompts, and per virtual token its norm and nearest vocabulary tokens (soft prompts only: a
    deep prompt's rows are keys and values, not input embeddings)."""
    values = {info.name: processor.prompt_values(info.name) for info in infos}
    report = {
        "object": "comparison",
        "tasks": {},
        "embedding_norms": embedding_norm_stats(processor.input_embeddings),
    }
    for info in infos:
        prompt = values[info.name]
        kind = processor.prompt_kinds.get(info.kind)
        # Only rows in the token space have nearest tokens that mean something.
        soft = kind is not None and kind.enters_as_embeddings
        report["tasks"][info.name] = {
            "kind": info.kind,
            "shape": list(prompt.shape),
            "norms": [round(float(x), 4) for x in prompt.norm(dim=-1)],
            "nearest_tokens": nearest_tokens(
                processor.input_embeddings, processor.tokenizer, prompt, k
            )
            if soft
            else None,
        }
    a, b = (info.name for info in infos)
    if infos[0].kind == infos[1].kind and values[a].shape[-1] == values[b].shape[-1]:
        report["similarity"], report["similarity_note"] = task_similarity(values)[a][b], None
    else:
        report["similarity"] = None
        report["similarity_note"] = (
            f"'{a}' is a {infos[0].kind} prompt and '{b}' a {infos[1].kind} prompt: "
            "their vectors live in different spaces"
        )
    return report


def _template_and_labels(name: str, meta: dict) -> dict:
    """The template's text and fields, and the verbalizer's labels and targets, read the way
    `/v1/classify` reads them (`data.task_from_meta`); a meta that cannot classify says why."""
    out = {"template": None, "fields": [], "labels": None, "targets": None, "classify_error": None}
    try:
        template = template_from_meta(name, meta)
        out["template"], out["fields"] = template.text, list(template.fields)
        if isinstance(meta.get("verbalizer"), dict):
            verbalizer = task_from_meta(name, meta).verbalizer
            out["labels"], out["targets"] = list(verbalizer.labels), list(verbalizer.targets)
    except (ConfigError, SoftPromptError) as exc:
        out["classify_error"] = str(exc)
    return out


def _training_settings(training) -> dict | None:
    if not isinstance(training, dict):
        return None
    return {key: value for key, value in training.items() if key not in PATH_SETTINGS}


def _stored_files(processor: InputProcessor, info: TaskInfo) -> dict[str, int]:
    """Its files and their sizes in the bank ({} for a task added in memory, or one just deleted)."""
    if processor.bank is None or info.version is None:
        return {}
    try:
        return processor.bank.stored_files(info.name)
    except SoftPromptError:
        return {}


def _asset(name: str) -> Response:
    body = resources.files("softprompt.api").joinpath("static", name).read_bytes()
    return Response(body, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
