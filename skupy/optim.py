"""AdamW with a linear learning-rate schedule, and global gradient-norm clipping.

The update itself runs in C (skupy._core.adamw_update) on the NumPy arrays of
parameters, gradients and moments; this module keeps the step count and the
schedule.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import _core


class LinearSchedule:
    """Learning rate that warms up linearly for warmup_steps, then decays linearly to 0 at total_steps.

    Matches transformers' get_linear_schedule_with_warmup: the rate used at
    1-based step s is lr * (s - 1) / warmup_steps during warm-up and
    lr * (total_steps - (s - 1)) / (total_steps - warmup_steps) after it.
    """

    def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps), got {warmup_steps}")
        self.lr = lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        """Return the learning rate for 1-based step."""
        done = step - 1
        if done < self.warmup_steps:
            return self.lr * done / self.warmup_steps
        remaining = max(0, self.total_steps - done)
        return self.lr * remaining / max(1, self.total_steps - self.warmup_steps)


class AdamW:
    """torch.optim.AdamW's update on a dict of float32 NumPy parameters.

    params: name -> array updated in place. Moments are created on first use.
    schedule: None for a constant rate, or a callable from 1-based step to rate.
    """

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, schedule: Optional[LinearSchedule] = None):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        self.params = params
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.step_count = 0
        self.m = {name: np.zeros_like(array) for name, array in params.items()}
        self.v = {name: np.zeros_like(array) for name, array in params.items()}

    def current_lr(self) -> float:
        """Learning rate of the next step."""
        return self.schedule(self.step_count + 1) if self.schedule else self.lr

    def step(self, grads: dict) -> float:
        """Apply one update from grads (name -> array); returns the learning rate used."""
        lr = self.current_lr()
        self.step_count += 1
        beta1, beta2 = self.betas
        for name, grad in grads.items():
            if name not in self.params:
                raise KeyError(f"gradient for unknown parameter {name!r}")
            _core.adamw_update(self.params[name], grad, self.m[name], self.v[name], lr, beta1, beta2,
                               self.eps, self.weight_decay, self.step_count)
        return lr

    def state_dict(self) -> dict:
        """Moments and step count as arrays and plain values, for checkpoints."""
        state = {"step_count": self.step_count}
        for name in self.params:
            state[f"m.{name}"] = self.m[name]
            state[f"v.{name}"] = self.v[name]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        for name in self.params:
            np.copyto(self.m[name], state[f"m.{name}"])
            np.copyto(self.v[name], state[f"v.{name}"])


def global_grad_norm(grads: dict) -> float:
    """L2 norm over all gradient arrays, summed in double in a fixed order."""
    return math.sqrt(sum(_core.sum_squares(grad) for grad in grads.values()))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    Uses torch.nn.utils.clip_grad_norm_'s factor max_norm / (norm + 1e-6).
    """
    norm = global_grad_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for grad in grads.values():
            _core.axpby(grad, grad, grad, factor, 0.0)
    return norm
