"""Deep prompts handed to vLLM: a folder of prefix files its KV connector reads.

vLLM cannot take a per-layer key/value prefix in a request, so the gateway publishes each deep
prompt's KV once, as `FOLDER/SHA.safetensors` ("kv" [layers, 2, kv_heads, N, head_dim], float32,
metadata {"sha": SHA}), and the request names SHA (`plugin/softprompt_deep_connector.py` writes
that K/V into the request's first N cache slots). SHA is the hash of the tensor's bytes, so a file
never changes once written: a new version of a task is a new file, two gateways publishing the
same prompt write the same bytes, and a request can never meet half of another version. Files are
written atomically (`atomic.write_file`); the folder only grows by the deep prompts actually
served (0.74 MB for a 16-token SmolLM2 prompt), and a folder the gateway created is removed when
it stops.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch
from safetensors.torch import save

from softprompt.atomic import write_file
from softprompt.errors import BackendUnavailableError, ConfigError
from softprompt.prompting.deep import PrefixShape, rows_to_kv

PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
"""What goes on vLLM's PYTHONPATH: the connector module, importable without softprompt."""
CONNECTOR = "SoftpromptDeepConnector"
CONNECTOR_MODULE = "softprompt_deep_connector"
PARAMS_KEY = "softprompt_deep"  # the connector's PARAMS_KEY
SALT_PREFIX = "softprompt-deep-"  # the connector's SALT_PREFIX
PLACEHOLDER_ID = 0  # any id works: its K/V is overwritten before it is ever attended to


def kv_transfer_config(folder: Path | str) -> dict:
    """vLLM's `--kv-transfer-config` that loads the connector over `folder`."""
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_consumer",
        "kv_connector_extra_config": {
            "prefix_dir": str(folder),
            "placeholder_id": PLACEHOLDER_ID,
        },
    }


class PrefixSpool:
    """The folder of published prefixes, shared with vLLM's connector."""

    def __init__(self, folder: Path | str | None = None):
        self.owned = folder is None
        """Created here (a temporary folder), so removed by `close`."""
        self.folder = (
            Path(tempfile.mkdtemp(prefix="softprompt-deep-")) if folder is None else Path(folder)
        )
        if not self.folder.is_dir():
            raise ConfigError(f"--vllm-prefix-dir {self.folder} is not a folder")
        self._lock = threading.Lock()
        self._published: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task -> sha

    def publish(self, task, shape: PrefixShape) -> str:
        """The SHA of `task`'s deep prompt (a registry `LoadedTask`), its file written if new.

        Computed once per loaded version: the registry replaces the entry when the bank's version
        changes, which drops it from this weak map.
        """
        sha = self._published.get(task)
        if sha is None:
            kv = rows_to_kv(task.prompt.detach().float().cpu(), shape).contiguous()
            sha = hashlib.sha256(kv.numpy().tobytes()).hexdigest()[:32]
            self._write(sha, kv)
            self._published[task] = sha
        return sha

    def _write(self, sha: str, kv: torch.Tensor) -> None:
        path = self.folder / f"{sha}.safetensors"
        with self._lock:  # one writer per process: write_file's temp name is per process
            if path.exists():
                return
            try:
                write_file(path, save({"kv": kv}, metadata={"sha": sha}))
            except OSError as exc:  # vLLM could not read it either: this request cannot run
                raise BackendUnavailableError(
                    f"cannot publish a deep prompt for vLLM into {self.folder}: {exc}"
                ) from exc

    def request_fields(self, task, shape: PrefixShape, ids: list[int]) -> dict:
        """The completion fields that carry `task`'s deep prompt before token ids `ids`."""
        sha = self.publish(task, shape)
        return {
            "prompt": [PLACEHOLDER_ID] * task.length + list(ids),
            "kv_transfer_params": {PARAMS_KEY: {"sha": sha, "task": task.name}},
            "cache_salt": SALT_PREFIX + sha,
        }

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)
