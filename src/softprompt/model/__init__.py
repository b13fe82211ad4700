"""Model: the frozen causal LM, loaded once (embedded GGUF -> safetensors cache), and its fingerprint.

loading.py      load_model, LoadedModel, load_front_end (tokenizer + input embeddings, no layers),
                freeze, fingerprint, describe, eos_token_ids
small_batch.py  a Linear whose matmul stays exact and fast for a few rows (decode steps on CPU)
"""

from softprompt.model.loading import (
    DEFAULT_MODEL,
    FrontEnd,
    LoadedModel,
    describe,
    eos_token_ids,
    fingerprint,
    freeze,
    load_front_end,
    load_model,
    resolve_model_source,
    softprompt_home,
)
from softprompt.model.small_batch import SMALL_ROWS, SmallBatchLinear, use_small_batch_matmul

__all__ = [
    "DEFAULT_MODEL",
    "SMALL_ROWS",
    "FrontEnd",
    "LoadedModel",
    "SmallBatchLinear",
    "describe",
    "eos_token_ids",
    "fingerprint",
    "freeze",
    "load_front_end",
    "load_model",
    "resolve_model_source",
    "softprompt_home",
    "use_small_batch_matmul",
]
