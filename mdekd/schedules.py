"""Learning-rate schedules for AdamW: cosine with linear warm-up, and one-cycle."""

import math

import keras
from keras import ops

SCHEDULES = ("cosine", "onecycle")


@keras.saving.register_keras_serializable(package="mdekd")
class OneCycleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle policy (Smith 2018, as in PyTorch's ``OneCycleLR`` with cosine annealing).

    The rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of
    ``total_steps`` and anneals to ``max_lr / (div_factor * final_div_factor)`` by the end.
    """

    def __init__(self, max_lr, total_steps, pct_start=0.3, div_factor=25.0,
                 final_div_factor=1e4):
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        up_steps = max(1.0, self.pct_start * self.total_steps)
        down_steps = max(1.0, self.total_steps - up_steps)

        def anneal(start, end, fraction):
            fraction = ops.clip(fraction, 0.0, 1.0)
            return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * fraction))

        rising = anneal(initial, self.max_lr, step / up_steps)
        falling = anneal(self.max_lr, final, (step - up_steps) / down_steps)
        return ops.where(step < up_steps, rising, falling)

    def get_config(self):
        return {
            "max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
            "div_factor": self.div_factor, "final_div_factor": self.final_div_factor,
        }


def make_schedule(name, learning_rate, total_steps, warmup_steps=0):
    """Peak ``learning_rate`` over ``total_steps`` optimiser steps; ``name`` in ``SCHEDULES``."""
    if name == "cosine":
        warmup_steps = min(int(warmup_steps), max(0, total_steps - 1))
        if warmup_steps:
            return keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=learning_rate * 0.01, decay_steps=total_steps - warmup_steps,
                alpha=0.01, warmup_target=learning_rate, warmup_steps=warmup_steps)
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps, alpha=0.01)
    if name == "onecycle":
        return OneCycleSchedule(learning_rate, total_steps)
    raise ValueError(f"--schedule: unknown schedule '{name}'; expected one of {SCHEDULES}")
