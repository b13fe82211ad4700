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

import torch
from torch import nn

from softprompt.bank import SavedPrompt, peft_prefix_config
from softprompt.errors import ConfigError, IncompatiblePromptError
from softprompt.model.loading import LoadedModel
from softprompt.prompting import inject
from softprompt.prompting.inject import PrefixShape
from softprompt.prompting.prompted import PromptedModel
from softprompt.prompting.soft import NO_TASK, PromptTable

log = logging.getLogger(__name__)


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


class DeepPrompt(nn.Module):
    """The deep prompt kind (P-tuning v2; PEFT's PREFIX_TUNING): a trainable key/value prefix in
    every layer, entering the forward pass as each row's cached KV prefix (a `PromptKind`,
    prompting/kind.py). A task starts from the KV its initial soft prompt computes.

    Two training levers (measured in bench/quality_sst2.py): `reparam_hidden` > 0 trains each new
    task's prefix through a `PrefixReparam` MLP of that width (the MLPs are this module's
    parameters, so they train with the prompts); `prefix_layers` = k > 0 trains the prefix of the
    last k layers only (the others keep the initial soft prompt's KV), and the backward pass then
    stops at the first of those k layers: a step costs less.
    """

    name = "deep"
    peft_type = "PREFIX_TUNING"
    default_learning_rate = 1e-2
    """The best of bench/quality_sst2.py's screen (SST-2, chosen on validation rows never reported)."""
    enters_as_embeddings = False

    def __init__(self, *, reparam_hidden: int = 0, prefix_layers: int = 0):
        super().__init__()
        self.reparam_hidden, self.prefix_layers = reparam_hidden, prefix_layers
        self.reparams = nn.ModuleDict()
        self.last_layers_only: set[str] = set()  # tasks that train their last prefix_layers only
        self.shape: PrefixShape | None = None  # the model's KV geometry, read by `bind`

    def bind(self, model) -> int:
        self.shape = prefix_shape(model)
        if not 0 <= self.prefix_layers <= self.shape.layers:
            raise ConfigError(
                f"prefix_layers must be in 0..{self.shape.layers}, not {self.prefix_layers}"
            )
        if self.reparam_hidden and self.prefix_layers:
            raise ConfigError(
                "use reparam_hidden or prefix_layers, not both (the MLP would move "
                "the layers prefix_layers keeps fixed)"
            )
        return self.shape.row_width

    def add(self, model, table: PromptTable, name: str, values: torch.Tensor) -> int:
        """From a soft prompt [n, d] (its KV; the task trains with the levers) or a KV prefix
        [layers, 2, kv_heads, n, head_dim]."""
        soft = values if values.dim() == 2 else None
        kv = values if soft is None else prompt_kv(model, soft)
        expected = (self.shape.layers, 2, self.shape.kv_heads, kv.shape[-2], self.shape.head_dim)
        if tuple(kv.shape) != expected:
            raise IncompatiblePromptError(
                f"deep prompt {name!r} has shape {tuple(kv.shape)}, the model needs {expected}"
            )
        task_id = self.add_stored(table, name, kv_to_rows(kv.float()))
        if soft is not None and self.reparam_hidden:
            self.reparams[name] = PrefixReparam(soft, self.shape.row_width, self.reparam_hidden)
        if soft is not None and self.prefix_layers:
            self.last_layers_only.add(name)
        return task_id

    def add_stored(self, table: PromptTable, name: str, rows: torch.Tensor) -> int:
        task_id = table.add(name, rows)
        if name in self.reparams:  # replaced: the new values start without an MLP of their own
            del self.reparams[name]
        self.last_layers_only.discard(name)
        return task_id

    def rows(self, table: PromptTable, task_id: int) -> torch.Tensor:
        """Task `task_id`'s prefix rows [n, W], through its reparam MLP if it has one."""
        rows, name = table.prompts[task_id], table.names[task_id]
        return self.reparams[name](rows) if name in self.reparams else rows

    def task_prefix(self, table: PromptTable, task_id: int, dtype) -> inject.PromptPrefix:
        """Task `task_id`'s per-layer KV prefix. A task that trains its last prefix_layers only
        has the first layers' KV cut from the graph: they get no gradient (Adam moves nothing;
        weight decay is off by default), and since nothing below the first trained layer then
        needs a gradient, backward stops there instead of running through every layer."""
        prefix = rows_to_prefix(self.rows(table, task_id), self.shape, dtype)
        if table.names[task_id] in self.last_layers_only:
            frozen = self.shape.layers - self.prefix_layers
            prefix.keys[:frozen] = [k.detach() for k in prefix.keys[:frozen]]
            prefix.values[:frozen] = [v.detach() for v in prefix.values[:frozen]]
        return prefix

    def enter(self, model, table: PromptTable, task_ids: torch.Tensor) -> inject.PromptInputs:
        """Each row's prefix (None: no task), built once per task."""
        dtype = model.get_input_embeddings().weight.dtype
        ids = task_ids.tolist()
        built = {t: self.task_prefix(table, t, dtype) for t in set(ids) if t != NO_TASK}
        if not built:
            return inject.PromptInputs()
        return inject.PromptInputs(prefixes=[built.get(t) for t in ids])

    def fold(self, table: PromptTable) -> None:
        """Write each reparameterised prefix into its plain rows and drop the MLPs (after training,
        before saving or serving: what is stored is the prefix, never the MLP)."""
        with torch.no_grad():
            for name in list(self.reparams):
                task_id = table.index(name)
                table.prompts[task_id].copy_(self.rows(table, task_id))
                del self.reparams[name]

    def peft_config(self, model, rows: torch.Tensor, config, base_name: str) -> dict:
        return peft_prefix_config(
            num_virtual_tokens=rows.shape[0],
            num_layers=self.shape.layers,
            kv_heads=self.shape.kv_heads,
            head_dim=self.shape.head_dim,
            base_model_name_or_path=base_name,
        )

    def saved_meta(self, info: dict, config) -> dict:
        return {"kind": "deep_prompt", **info}

    def served_prefix(
        self, model, rows: torch.Tensor, shape: PrefixShape, dtype: torch.dtype
    ) -> inject.PromptPrefix:
        """The rows are the keys and values: reshaped, nothing computed."""
        return rows_to_prefix(rows, shape, dtype)


class DeepPromptModel(PromptedModel):
    """`PromptedModel(model, prompts, kind=DeepPrompt(...))` under its own name, with the deep
    kind's views: `shape`, `kv(name)`, `task_rows`, `reparams`, `fold_reparams`. Its `forward`
    returns the logits tensor itself (B, L, V)."""

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        prompts: dict | None = None,
        *,
        tokenizer=None,
        reparam_hidden: int = 0,
        prefix_layers: int = 0,
    ):
        kind = DeepPrompt(reparam_hidden=reparam_hidden, prefix_layers=prefix_layers)
        super().__init__(model, prompts, tokenizer=tokenizer, kind=kind)

    @property
    def shape(self) -> PrefixShape:
        return self.kind.shape

    @property
    def reparams(self) -> nn.ModuleDict:
        return self.kind.reparams

    def task_rows(self, task_id: int) -> torch.Tensor:
        """Task `task_id`'s prefix rows [n, W], through its reparam MLP if it has one."""
        return self.kind.rows(self.table, task_id)

    def kv(self, name: str) -> torch.Tensor:
        """Task `name`'s prefix as [layers, 2, kv_heads, n, head_dim] (a view of the parameter)."""
        return rows_to_kv(self.table.get(name), self.shape)

    def fold_reparams(self) -> None:
        self.kind.fold(self.table)

    def add_saved(self, saved: SavedPrompt, name: str | None = None) -> int:
        """Add a deep prompt read from a bank (or a PEFT prefix-tuning folder), checked first."""
        return self.add_task(name or saved.name, saved)

    def forward(self, input_ids, attention_mask=None, tasks=None) -> torch.Tensor:
        """Logits in the caller's layout [B, L, V]."""
        return super().forward(input_ids, attention_mask, tasks).logits


__all__ = [
    "DeepPrompt",
    "DeepPromptModel",
    "PrefixShape",
    "prefix_shape",
    "prompt_kv",
    "kv_to_rows",
    "rows_to_kv",
]
