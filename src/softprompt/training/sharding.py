"""FSDP for prompt tuning: the frozen base model sharded across processes, the prompt replicated.

Under `accelerate launch --use_fsdp` (or an accelerate config with `distributed_type: FSDP`) the
Trainer calls `shard_frozen_base` instead of keeping a whole copy of the model per process. Each
decoder layer becomes one FSDP2 unit (torch's `fully_shard`): its weights are split across the
processes and gathered only while that layer runs, in forward and again in backward. The frozen
layers get no gradients, so nothing is reduce-scattered; the prompt table stays an ordinary tensor
on every process, and the Trainer sums its gradient across processes exactly as without FSDP, so
N sharded processes compute what one process computes on the same global batch.

The input embeddings (which `prompting/inject.py` calls directly to place the prompt), the final norm and the
output head stay whole on each process: they are a small part of a large model, and sharding the
embedding would need every process to join each of its lookups.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from softprompt.errors import ConfigError

log = logging.getLogger(__name__)


def fsdp_requested(accelerator) -> bool:
    """FSDP asked for by `accelerate launch --use_fsdp` (or its config), on GPUs or on CPUs.

    On CPU processes accelerate keeps distributed_type MULTI_CPU and drops the flag, but torch's
    FSDP2 runs there too (gloo), so the launch flag itself is honoured.
    """
    from accelerate import DistributedType
    from accelerate.utils import parse_flag_from_env

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.num_processes > 1 and parse_flag_from_env("ACCELERATE_USE_FSDP")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (the classes transformers names in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"cannot find the decoder layers of {type(model).__name__} to shard "
            f"(its _no_split_modules is {sorted(names) or 'empty'})"
        )
    return layers


def shard_frozen_base(model: nn.Module, device: torch.device, world_size: int) -> int:
    """Shard every decoder layer of the frozen `model` over `world_size` processes; returns how many.

    Needs torch.distributed to be initialised (accelerate does that). Only a frozen base can be
    sharded here: training base weights (LoRA, full fine-tuning) would need sharded optimizer state.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "FSDP here shards a frozen base model: train soft or deep prompts with it, "
            "not LoRA or full fine-tuning"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    log.info(
        "FSDP: %d decoder layers sharded over %d processes; the prompt is replicated",
        len(layers),
        world_size,
    )
    return len(layers)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters held by this process (a shard's local part only)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
