"""The LR range test (`softprompt train --learning-rate auto`): one short run with a growing
learning rate through the one Trainer, then the values are put back."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from softprompt.data import Example
from softprompt.errors import ConfigError
from softprompt.training.trainer import TrainConfig, Trainer


@dataclass
class LearningRateSearch:
    """What the LR range test saw, and the learning rate it suggests."""

    suggested: float
    learning_rates: list[float]
    losses: list[float]
    """Smoothed training loss after each step, at learning_rates[i]."""


def find_learning_rate(
    prompted,
    examples: list[Example],
    config: TrainConfig,
    *,
    min_lr: float = 1e-4,
    max_lr: float = 10.0,
    steps: int = 60,
    smoothing: float = 0.8,
) -> LearningRateSearch:
    """LR range test (Smith 2017; fastai's lr_find): train from the current values with the
    learning rate growing geometrically from min_lr to max_lr, one step each, and suggest a
    tenth of the rate at the lowest smoothed loss (the lowest point is already too hot to keep).
    The trainable values are restored afterwards, so the search leaves no trace."""
    if not 0 < min_lr < max_lr or steps < 5:
        raise ConfigError("lr search needs 0 < min_lr < max_lr and at least 5 steps")
    probe = Trainer(
        prompted,
        examples,
        replace(
            config,
            max_steps=steps,
            learning_rate=min_lr,
            warmup_steps=0,
            lr_scheduler_type="constant",
            report_to=["none"],
        ),
    )
    start = probe._snapshot()
    growth = (max_lr / min_lr) ** (1 / (steps - 1))
    probe.scheduler = torch.optim.lr_scheduler.LambdaLR(probe.optimizer, lambda i: growth**i)
    rates, losses, average = [], [], 0.0
    for i in range(steps):
        rates.append(probe.optimizer.param_groups[0]["lr"])
        average = smoothing * average + (1 - smoothing) * probe.train_step()["loss"]
        losses.append(average / (1 - smoothing ** (i + 1)))  # bias-corrected running mean
        if not math.isfinite(losses[-1]) or losses[-1] > 4 * min(losses):
            break  # diverged: every larger rate is worse
    probe.best_state = start
    probe.restore_best()
    best = min(range(len(losses)), key=losses.__getitem__)
    return LearningRateSearch(rates[best] / 10, rates, losses)
