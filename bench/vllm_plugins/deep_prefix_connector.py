"""An out-of-tree vLLM KV connector that serves deep prompts (per-layer KV prefixes) exactly.

Feasibility probe for issue 25 (b); runs inside vLLM's own environment (.venv-vllm), imported by
vLLM through `--kv-transfer-config '{"kv_connector": "DeepPrefixConnector",
"kv_connector_module_path": "deep_prefix_connector", "kv_role": "kv_consumer",
"kv_connector_extra_config": {"prefix_dir": DIR, "placeholder_id": ID}}'` with this folder on
PYTHONPATH. Nothing here imports softprompt.

A request for a deep-prompted task is sent as N placeholder token ids + the real prompt's ids, with
`kv_transfer_params = {"deep_prompt": {"task": NAME, "sha": SHA}}` and a `cache_salt` unique to
(task, version). The task's prefix is `DIR/NAME.safetensors`, tensor "kv" [layers, 2, kv_heads, N,
head_dim] (what the HF cache holds: post-RoPE keys, values), metadata {"sha": SHA}.

Scheduler side: `get_num_new_matched_tokens` says the first N tokens (less what the local prefix
cache already holds) are available externally; vLLM then allocates their slots, marks them
computed and runs the real tokens only, at positions N.. (as the built-in engine does).
Worker side: `start_load_kv` writes the prefix's K/V into those N slots of every layer, before the
forward, through the attention backend's own `do_kv_cache_update` (the same call vLLM uses to
store computed K/V, so the backend's cache layout -- CPU_ATTN's packed ISA layout, FlashAttention's
[2, blocks, block_size, heads, dim] -- is never hand-written here).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.deep_prefix_connector")  # under "vllm": its handler prints INFO

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass
class PrefixLoad:
    req_id: str
    task: str
    sha: str
    start: int  # first prefix position to write (the local prefix cache may hold the ones before)
    end: int  # N
    block_ids: list[int]  # the request's blocks (group 0), covering positions 0..end-1 at least
    error: str | None = None  # a refused request: its claimed blocks are reported as failed loads


@dataclass
class DeepPrefixMetadata(KVConnectorMetadata):
    loads: list[PrefixLoad] = field(default_factory=list)


class DeepPrefixConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._dir = extra["prefix_dir"]
        self._placeholder = int(extra["placeholder_id"])
        self._block_size = vllm_config.cache_config.block_size
        self._lengths: dict[tuple[str, str], int] = {}  # scheduler: (task, sha) -> N
        self._pending: dict[str, PrefixLoad] = {}  # scheduler: loads for the next step
        self._prefixes: dict[tuple[str, str], torch.Tensor] = {}  # worker: (task, sha) -> kv
        self._failed_blocks: set[int] = set()  # worker: blocks of refused requests, to report
        self._kv_caches: dict[str, torch.Tensor] = {}
        logger.info(
            "DeepPrefixConnector (%s): prefix_dir=%s placeholder=%d block_size=%d",
            role.name,
            self._dir,
            self._placeholder,
            self._block_size,
        )

    # ------------------------------------------------------------ shared

    def _file(self, task: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task) or task.startswith("."):
            raise ValueError(f"bad deep-prompt task name {task!r}")
        return os.path.join(self._dir, f"{task}.safetensors")

    def _spec(self, request: Request) -> tuple[str, str] | None:
        params = request.kv_transfer_params or {}
        spec = params.get("deep_prompt")
        if not spec:
            return None
        return str(spec.get("task")), str(spec.get("sha"))

    # ------------------------------------------------------------ scheduler side

    def _length(self, task: str, sha: str) -> int:
        key = (task, sha)
        if key not in self._lengths:
            with safe_open(self._file(task), "pt") as f:
                stored = (f.metadata() or {}).get("sha")
                if stored != sha:
                    raise ValueError(f"deep prompt {task!r}: version {stored} on disk, {sha} asked")
                self._lengths[key] = int(f.get_slice("kv").get_shape()[3])
        return self._lengths[key]

    def _check(self, request: Request, spec: tuple[str, str]) -> tuple[int, str | None]:
        """(N, None) for a valid deep-prompt request, else (0, why it is refused)."""
        try:
            n = self._length(*spec)
        except (OSError, ValueError) as exc:
            return 0, f"no prefix {spec}: {exc}"
        ids = list(request.prompt_token_ids or [])
        if len(ids) <= n:
            return 0, f"needs at least one real token after its {n} placeholders"
        if any(t != self._placeholder for t in ids[:n]):
            return 0, f"its first {n} prompt ids are not the placeholder {self._placeholder}"
        if not request.cache_salt:
            return 0, "it has no cache_salt (its placeholder blocks would be shared across tasks)"
        return n, None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        spec = self._spec(request)
        if spec is None:
            return 0, False
        n, problem = self._check(request, spec)
        if problem:
            # Claim one token, then report its block as a failed load: with vLLM's default
            # kv_load_failure_policy "fail" the request ends in an error instead of running
            # its placeholders as text (and caching their K/V under the task's salt).
            return (1 if num_computed_tokens == 0 and request.num_tokens > 1 else 0), False
        return max(0, n - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ):
        if num_external_tokens <= 0:
            return
        spec = self._spec(request)
        n, problem = self._check(request, spec)
        block_ids = list(blocks.get_block_ids()[0])  # all of the request's blocks (the
        # scheduler passes kv_cache_manager.get_blocks(request_id)), local prefix hits included
        if problem:
            logger.error("deep-prompt request %s refused: %s", request.request_id, problem)
            self._pending[request.request_id] = PrefixLoad(
                request.request_id, *spec, 0, num_external_tokens, block_ids, error=problem
            )
            return
        self._pending[request.request_id] = PrefixLoad(
            request.request_id, *spec, n - num_external_tokens, n, block_ids
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DeepPrefixMetadata(loads=list(self._pending.values()))
        self._pending.clear()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]):
        return False, None

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = dict(kv_caches)
        shapes = {tuple(t.shape) for t in kv_caches.values()}
        logger.info("DeepPrefixConnector: %d KV cache layers, shapes %s", len(kv_caches), shapes)

    def _prefix(self, task: str, sha: str) -> torch.Tensor:
        key = (task, sha)
        if key not in self._prefixes:
            with safe_open(self._file(task), "pt") as f:
                if (f.metadata() or {}).get("sha") != sha:
                    raise ValueError(f"deep prompt {task!r} on disk is not version {sha}")
                self._prefixes[key] = f.get_tensor("kv")  # [layers, 2, H_kv, N, hd]
        return self._prefixes[key]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DeepPrefixMetadata)
        for load in meta.loads:
            if load.error is not None:
                blocks_used = -(-load.end // self._block_size)
                self._failed_blocks.update(load.block_ids[:blocks_used])
                logger.error("DeepPrefixConnector: refused %s: %s", load.req_id, load.error)
                continue
            kv = self._prefix(load.task, load.sha)
            positions = torch.arange(load.start, load.end)
            blocks = torch.tensor(load.block_ids, dtype=torch.long)
            written = 0
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                impl = getattr(layer, "impl", None)
                if not isinstance(cache, torch.Tensor) or cache.numel() == 0 or impl is None:
                    continue
                match = _LAYER_INDEX.search(name)
                if match is None:
                    continue
                index = int(match.group(1))
                block_size = self._block_size
                slots = blocks[positions // block_size] * block_size + positions % block_size
                slots = slots.to(cache.device)
                # [H_kv, n, hd] -> [n, H_kv, hd], the layout do_kv_cache_update takes
                key = kv[index, 0, :, load.start : load.end].transpose(0, 1)
                value = kv[index, 1, :, load.start : load.end].transpose(0, 1)
                # in the model's dtype, as the K/V vLLM computes (do_kv_cache_update casts or
                # quantises them into the cache's dtype itself)
                dtype = self._vllm_config.model_config.dtype
                key = key.to(cache.device, dtype).contiguous()
                value = value.to(cache.device, dtype).contiguous()
                impl.do_kv_cache_update(layer, key, value, cache, slots)
                written += 1
            logger.info(
                "DeepPrefixConnector: wrote %s positions %d..%d into %d layers (request %s)",
                load.task,
                load.start,
                load.end - 1,
                written,
                load.req_id,
            )

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done in start_load_kv before the forward

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return

    def wait_for_save(self):
        return
