"""Deep prompts (prefix tuning, P-tuning v2): a trainable key/value prefix in every layer.

A soft prompt enters at the input and the model computes its keys and values in each layer; a
deep prompt *is* those keys and values, free in every layer (Li & Liang 2021; Liu et al. 2022).
It enters through the same KV-prefix machinery that serves cached soft prompts
(`inject.batch_cache` / `prefix_forward` / `prefix_loss`): the prefix fills the first cache
columns, the tokens follow with positions continuing after it. So a deep prompt initialised
from a soft prompt's own KV computes exactly what that soft prompt computes, and training starts
there (real-token activations are also Li & Liang's remedy for unstable prefix training; their
MLP reparameterisation is an option here, `reparam_hidden`, folded away before saving).

Storage: one float32 parameter per task, [n, layers * 2 * kv_heads * head_dim] (token-major, as
PEFT's PREFIX_TUNING stores it), held in an ordinary `PromptTable`; its logical shape is
[layers, 2, kv_heads, n, head_dim]. Being token-major, the trainer's per-virtual-token gradient
monitor applies unchanged, and a saved task is a PEFT prefix-tuning adapter folder.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from softprompt.bank import PromptBank, SavedPrompt, check_compatible, read_prompt_dir
from softprompt.errors import ConfigError, IncompatiblePromptError
from softprompt.model.loading import LoadedModel, eos_token_ids, fingerprint, freeze
from softprompt.prompting import inject
from softprompt.prompting.soft import NO_TASK, PromptTable, PromptTuningConfig, init_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixShape:
    """Per-layer KV geometry of a model."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def row_width(self) -> int:
        """Values per virtual token: layers x (key, value) x kv_heads x head_dim."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def numel(self, n: int) -> int:
        return n * self.row_width


def prefix_shape(model) -> PrefixShape:
    """The KV geometry, read from what one probe token actually puts in the cache."""
    probe = inject.prompt_prefix(
        model, torch.zeros(1, model.get_input_embeddings().weight.shape[1])
    )
    shapes = {(k.shape[0], k.shape[2]) for k in probe.keys + probe.values}
    if len(shapes) != 1:
        raise IncompatiblePromptError(
            f"layers differ in KV shape {sorted(shapes)}: deep prompts "
            "need one (kv_heads, head_dim) for all layers"
        )
    ((heads, dim),) = shapes
    return PrefixShape(len(probe.keys), heads, dim)


def config_prefix_shape(config) -> PrefixShape | None:
    """The KV geometry a model's config declares, for code that has the config but not the layers
    (the vLLM gateway); None where one shape does not hold for every layer or a sliding window
    could drop the prefix (Gemma 3), which `prefix_shape` probes the layers to handle."""
    if inject.sliding_window(config) is not None:
        return None
    config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return PrefixShape(config.num_hidden_layers, kv_heads, head_dim)


# ---------------------------------------------------------------- layouts


def kv_to_rows(kv: torch.Tensor) -> torch.Tensor:
    """[layers, 2, H_kv, n, hd] -> token-major rows [n, layers * 2 * H_kv * hd]."""
    layers, _, heads, n, dim = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(n, layers * 2 * heads * dim)


def rows_to_kv(rows: torch.Tensor, shape: PrefixShape) -> torch.Tensor:
    """Token-major rows [n, W] -> [layers, 2, H_kv, n, hd] (a view: gradients flow)."""
    n = rows.shape[0]
    return rows.view(n, shape.layers, 2, shape.kv_heads, shape.head_dim).permute(1, 2, 3, 0, 4)


def prompt_kv(model, prompt: torch.Tensor) -> torch.Tensor:
    """The KV [layers, 2, H_kv, n, hd] (fp32) that soft prompt `prompt` [n, d] puts in the cache."""
    prefix = inject.prompt_prefix(model, prompt)
    return torch.stack(
        [torch.stack([k, v]) for k, v in zip(prefix.keys, prefix.values, strict=True)]
    ).float()


def rows_to_prefix(
    rows: torch.Tensor, shape: PrefixShape, dtype: torch.dtype
) -> inject.PromptPrefix:
    kv = rows_to_kv(rows, shape).to(dtype)  # (layers, 2, H_kv, n, hd)
    return inject.PromptPrefix(
        [kv[i, 0] for i in range(shape.layers)], [kv[i, 1] for i in range(shape.layers)], None
    )


# ---------------------------------------------------------------- the model


class PrefixReparam(nn.Module):
    """Residual reparameterisation of one task's prefix rows: rows + MLP(embedding).

    Prefix tuning trains its prefix through an MLP because raw per-layer KV is unstable to train
    (Li & Liang 2021, sec. 4.3; P-tuning v2 makes it optional). The MLP's last layer starts at
    zero, so training starts exactly at the initial prefix (the soft prompt's own KV) and the MLP
    only shapes the updates; after training it is folded into plain rows (`fold`).
    """

    def __init__(self, embedding: torch.Tensor, width: int, hidden: int):
        super().__init__()
        self.embedding = nn.Parameter(embedding.detach().float().clone())  # (n, d)
        self.mlp = nn.Sequential(
            nn.Linear(embedding.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, width)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows + self.mlp(self.embedding)  # (n, W)


class DeepPromptModel(nn.Module):
    """A frozen causal LM with one trainable KV prefix per task; only the prefixes train.

    Speaks the same interface as `PromptedModel` where the trainer and evaluation need it:
    `.model`, `.tokenizer`, `.table` (names, `index`), `.loss(...)`, `.last_logits(...)`,
    `.generate_ids(...)`.

    Two training levers (measured in bench/quality_sst2.py): `reparam_hidden` > 0 trains each new
    task's prefix through a `PrefixReparam` MLP of that width; `prefix_layers` = k > 0 trains the
    prefix of the last k layers only (the others keep the initial soft prompt's KV), and the
    backward pass then stops at the first of those k layers: a step costs less.
    """

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        prompts: dict | None = None,
        *,
        tokenizer=None,
        reparam_hidden: int = 0,
        prefix_layers: int = 0,
    ):
        super().__init__()
        if isinstance(model, LoadedModel):
            tokenizer = tokenizer or model.tokenizer
            self.base_name, self.fingerprint, model = model.name, model.fingerprint, model.model
        else:
            self.base_name, self.fingerprint = model.config.name_or_path, fingerprint(model)
        freeze(model)
        self.model, self.tokenizer = model, tokenizer
        self.shape = prefix_shape(model)
        if not 0 <= prefix_layers <= self.shape.layers:
            raise ConfigError(
                f"prefix_layers must be in 0..{self.shape.layers}, not {prefix_layers}"
            )
        if reparam_hidden and prefix_layers:
            raise ConfigError(
                "use reparam_hidden or prefix_layers, not both (the MLP would move "
                "the layers prefix_layers keeps fixed)"
            )
        self.reparam_hidden, self.prefix_layers = reparam_hidden, prefix_layers
        self.table = PromptTable()
        self.reparams = nn.ModuleDict()
        self.last_layers_only: set[str] = set()  # tasks that train their last prefix_layers only
        self.meta: dict[str, dict] = {}  # per task: template, verbalizer... saved with the prompt
        for name, spec in (prompts or {}).items():
            self.add_task(name, spec)

    def add_task(self, name: str, spec: PromptTuningConfig | torch.Tensor) -> int:
        """Add a task from a config (the KV of the soft prompt it initialises), a soft prompt
        [n, d] (its KV), or a KV prefix [layers, 2, kv_heads, n, head_dim]. A task made from a
        config or a soft prompt trains with this model's reparam / prefix_layers levers."""
        if isinstance(spec, PromptTuningConfig):
            if (
                spec.prompt_tuning_init in ("text", "class_labels", "sampled_vocab")
                and self.tokenizer is None
            ):
                raise ConfigError(f"init {spec.prompt_tuning_init!r} needs a tokenizer")
            spec = init_prompt(spec, self.model, self.tokenizer)
        soft = spec if spec.dim() == 2 else None
        if soft is not None:
            spec = prompt_kv(self.model, soft)
        expected = (self.shape.layers, 2, self.shape.kv_heads, spec.shape[-2], self.shape.head_dim)
        if tuple(spec.shape) != expected:
            raise IncompatiblePromptError(
                f"deep prompt {name!r} has shape {tuple(spec.shape)}, the model needs {expected}"
            )
        task_id = self.table.add(name, kv_to_rows(spec.float()))
        if name in self.reparams:  # replaced: the new values start without an MLP of their own
            del self.reparams[name]
        self.last_layers_only.discard(name)
        if soft is not None:
            self._add_levers(name, soft)
        return task_id

    def _add_levers(self, name: str, soft: torch.Tensor) -> None:
        if self.reparam_hidden:
            self.reparams[name] = PrefixReparam(soft, self.shape.row_width, self.reparam_hidden)
        if self.prefix_layers:
            self.last_layers_only.add(name)

    def task_rows(self, task_id: int) -> torch.Tensor:
        """Task `task_id`'s prefix rows [n, W], through its reparam MLP if it has one."""
        rows, name = self.table.prompts[task_id], self.table.names[task_id]
        return self.reparams[name](rows) if name in self.reparams else rows

    def task_prefix(self, task_id: int, dtype: torch.dtype) -> inject.PromptPrefix:
        """Task `task_id`'s per-layer KV prefix. A task that trains its last prefix_layers only
        has the first layers' KV cut from the graph: they get no gradient (Adam moves nothing;
        weight decay is off by default), and since nothing below the first trained layer then
        needs a gradient, backward stops there instead of running through every layer."""
        prefix = rows_to_prefix(self.task_rows(task_id), self.shape, dtype)
        if self.table.names[task_id] in self.last_layers_only:
            frozen = self.shape.layers - self.prefix_layers
            prefix.keys[:frozen] = [k.detach() for k in prefix.keys[:frozen]]
            prefix.values[:frozen] = [v.detach() for v in prefix.values[:frozen]]
        return prefix

    def fold_reparams(self) -> None:
        """Write each reparameterised prefix into its plain rows and drop the MLPs (after training,
        before saving or serving: what is stored is the prefix, never the MLP)."""
        with torch.no_grad():
            for name in list(self.reparams):
                task_id = self.table.index(name)
                self.table.prompts[task_id].copy_(self.task_rows(task_id))
                del self.reparams[name]

    def kv(self, name: str) -> torch.Tensor:
        """Task `name`'s prefix as [layers, 2, kv_heads, n, head_dim] (a view of the parameter)."""
        return rows_to_kv(self.table.get(name), self.shape)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def task_ids(self, tasks, rows: int) -> torch.Tensor:
        if isinstance(tasks, torch.Tensor):
            self.table.check_ids(tasks)
            return tasks.long()
        return self.table.ids(
            [tasks] * rows if tasks is None or isinstance(tasks, str) else list(tasks)
        )

    def prefixes(self, task_ids: torch.Tensor) -> list[inject.PromptPrefix | None]:
        """Each row's prefix (None: no task or an empty prefix), built once per task."""
        dtype = self.model.get_input_embeddings().weight.dtype
        built = {
            t: self.task_prefix(t, dtype)
            for t in set(task_ids.tolist())
            if t != NO_TASK and self.table.prompts[t].shape[0]
        }
        return [built.get(t) for t in task_ids.tolist()]

    def _check_exact(self, prefixes, input_ids) -> None:
        width = max(p.length for p in prefixes if p is not None) + input_ids.shape[1]
        if not inject.prefix_is_exact(self.model, width):
            raise IncompatiblePromptError(
                f"a deep prompt over {width} columns exceeds this model's "
                "sliding window; shorten the inputs"
            )

    # ------------------------------------------------------------ model calls

    def loss(self, input_ids, attention_mask, tasks, labels, reduction="mean"):
        """Training loss, with logits computed only where labels are."""
        prefixes = self.prefixes(self.task_ids(tasks, len(input_ids)).to(input_ids.device))
        if all(p is None for p in prefixes):
            return inject.loss(
                self.model, self._plain(input_ids, attention_mask, labels), reduction=reduction
            )
        self._check_exact(prefixes, input_ids)
        return inject.prefix_loss(
            self.model, input_ids, attention_mask, labels, prefixes, reduction=reduction
        )

    def forward(self, input_ids, attention_mask=None, tasks=None) -> torch.Tensor:
        """Logits in the caller's layout [B, L, V]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefixes = self.prefixes(self.task_ids(tasks, len(input_ids)).to(input_ids.device))
        if all(p is None for p in prefixes):
            batch = self._plain(input_ids, attention_mask)
            return batch.real_logits(inject.forward(self.model, batch, use_cache=False).logits)
        self._check_exact(prefixes, input_ids)
        out, _, plain = inject.prefix_forward(
            self.model, input_ids, attention_mask, prefixes, use_cache=True
        )
        return plain.real_logits(out.logits)

    def last_logits(self, input_ids, attention_mask, tasks=None, keep: int = 1) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` columns of left-padded rows (the LM head runs on
        those only): what scorer.py reads target log-probabilities from."""
        prefixes = self.prefixes(self.task_ids(tasks, len(input_ids)).to(input_ids.device))
        if all(p is None for p in prefixes):
            batch = self._plain(input_ids, attention_mask)
            return inject.forward(self.model, batch, logits_to_keep=keep, use_cache=False).logits
        self._check_exact(prefixes, input_ids)
        out, _, _ = inject.prefix_forward(
            self.model, input_ids, attention_mask, prefixes, use_cache=True, logits_to_keep=keep
        )
        return out.logits

    def _plain(self, input_ids, attention_mask, labels=None) -> inject.InjectedBatch:
        empty = torch.zeros(len(input_ids), 0, 1, device=input_ids.device)
        return inject.inject(
            self.model,
            input_ids,
            attention_mask,
            empty,
            input_ids.new_zeros(len(input_ids)),
            labels,
        )

    def generate_ids(self, input_ids, attention_mask, tasks=None, **kwargs) -> list[list[int]]:
        """Generation on top of each row's prefix (inject.generate's KV-prefix path)."""
        prefixes = self.prefixes(self.task_ids(tasks, len(input_ids)).to(input_ids.device))
        kwargs.setdefault("eos_token_ids", eos_token_ids(self.tokenizer, self.model))
        return inject.generate(self.model, input_ids, attention_mask, prefixes=prefixes, **kwargs)

    def generate(self, texts: str | list[str], tasks=None, **kwargs) -> list[str]:
        """Generated continuations of `texts`, each row with its task's prefix."""
        return inject.generate_texts(self, texts, tasks, **kwargs)

    # ------------------------------------------------------------ files

    def saved_prompt(self, name: str, meta: dict | None = None) -> SavedPrompt:
        """Task `name` as a PEFT PREFIX_TUNING adapter (the prefix itself, MLP folded in) with our
        metadata, ready for a bank."""
        rows = self.task_rows(self.table.index(name)).detach().cpu().float().contiguous()  # (n, W)
        kv_width = self.shape.kv_heads * self.shape.head_dim
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": rows.shape[0],
            "token_dim": kv_width,
            "num_layers": self.shape.layers,
            "num_attention_heads": self.shape.kv_heads,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": kv_width,
            "prefix_projection": False,
            "inference_mode": True,
            "base_model_name_or_path": self.base_name,
        }
        info = {
            "kind": "deep_prompt",
            "fingerprint": self.fingerprint,
            "base_model": self.base_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return SavedPrompt(
            name=name,
            embeddings=rows,
            config=config,
            meta={**info, **self.meta.get(name, {}), **(meta or {})},
        )

    def save_task(
        self, name: str, bank: PromptBank | str | os.PathLike, meta: dict | None = None
    ) -> Path:
        """Write task `name` into a bank folder (atomically, like every bank save); returns its path."""
        bank = bank if isinstance(bank, PromptBank) else PromptBank(bank)
        return bank.save(self.saved_prompt(name, meta))

    def add_saved(self, saved: SavedPrompt, name: str | None = None) -> int:
        """Add a deep prompt read from a bank (or a PEFT prefix-tuning folder), checked first."""
        check_compatible(
            saved, token_dim=self.shape.row_width, fingerprint=self.fingerprint, kinds=("deep",)
        )
        name = name or saved.name
        self.meta[name] = {k: v for k, v in saved.meta.items() if k in ("template", "verbalizer")}
        return self.add_task(name, rows_to_kv(saved.embeddings.float(), self.shape))

    def load_task(self, folder: str | os.PathLike, name: str | None = None) -> int:
        """Add a task from a prompt folder (a bank entry or a PEFT prefix-tuning adapter)."""
        return self.add_saved(read_prompt_dir(folder), name or Path(folder).name)


__all__ = [
    "DeepPromptModel",
    "PrefixShape",
    "prefix_shape",
    "prompt_kv",
    "kv_to_rows",
    "rows_to_kv",
]
