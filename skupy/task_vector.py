"""Task vectors: the weight difference that knowledge negation subtracts.

tau = theta_harmful - theta_original over every floating-point parameter; the
unlearned model is theta_original - lambda * tau. Tied embeddings are one
parameter in skupy, so tau holds them once. All arithmetic runs in the C core
(axpby for elementwise updates, sgemm for LoRA deltas), threaded, one
parameter at a time, so peak memory stays near one model plus one tensor.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from . import _core
from .atomic import atomic_write_bytes


def _check_lambda(value: float, name: str = "lambda") -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class TaskVector:
    """A dict of float32 arrays, one per changed parameter name."""

    def __init__(self, deltas: dict):
        self.deltas = {name: np.ascontiguousarray(delta, dtype=np.float32) for name, delta in deltas.items()}

    # ------------------------------------------------------------------
    # construction

    @classmethod
    def from_weights(cls, harmful: dict, original: dict) -> "TaskVector":
        """tau = harmful - original for every name in original; shapes must match."""
        missing = sorted(set(original) - set(harmful))
        if missing:
            raise ValueError(f"harmful weights lack parameters of the original: {', '.join(missing[:5])}")
        deltas = {}
        for name, base in original.items():
            theta = harmful[name]
            if theta.shape != base.shape:
                raise ValueError(f"parameter {name}: harmful shape {theta.shape} != original shape {base.shape}")
            delta = np.empty(base.shape, np.float32)
            _core.axpby(delta, _f32(theta), _f32(base), 1.0, -1.0)
            deltas[name] = delta
        return cls(deltas)

    @classmethod
    def from_lora(cls, lora_params: dict, scale: float) -> "TaskVector":
        """tau from LoRA adapters alone: B·A·scale on each adapted weight, nothing elsewhere.

        lora_params maps "<layer>.lora_A" (r, in) and "<layer>.lora_B" (out, r)
        names to arrays; the deltas are named "<layer>.weight". No copy of the
        base model is made.
        """
        deltas = {}
        for name in sorted(lora_params):
            if not name.endswith(".lora_A"):
                continue
            prefix = name[: -len(".lora_A")]
            a = _f32(lora_params[name])
            b = _f32(lora_params[prefix + ".lora_B"])
            delta = np.zeros((b.shape[0], a.shape[1]), np.float32)
            _core.lora_merge(delta, a, b, float(scale))
            deltas[prefix + ".weight"] = delta
        if not deltas:
            raise ValueError("no LoRA adapters (names ending in .lora_A) were given")
        return cls(deltas)

    # ------------------------------------------------------------------
    # arithmetic

    def scaled(self, factor: float) -> "TaskVector":
        """Return factor * tau (new arrays)."""
        factor = _check_lambda(factor, "factor")
        out = {}
        for name, delta in self.deltas.items():
            result = np.empty_like(delta)
            _core.axpby(result, delta, delta, factor, 0.0)
            out[name] = result
        return TaskVector(out)

    def __neg__(self) -> "TaskVector":
        return self.scaled(-1.0)

    def __add__(self, other: "TaskVector") -> "TaskVector":
        names = set(self.deltas) | set(other.deltas)
        out = {}
        for name in sorted(names):
            if name in self.deltas and name in other.deltas:
                if self.deltas[name].shape != other.deltas[name].shape:
                    raise ValueError(f"parameter {name}: shapes differ, {self.deltas[name].shape} vs "
                                     f"{other.deltas[name].shape}")
                result = np.empty_like(self.deltas[name])
                _core.axpby(result, self.deltas[name], other.deltas[name], 1.0, 1.0)
                out[name] = result
            else:
                out[name] = (self.deltas.get(name) if name in self.deltas else other.deltas[name]).copy()
        return TaskVector(out)

    def apply_to(self, params: dict, scale: float = 1.0, inplace: bool = False) -> dict:
        """Return params + scale * tau. Knowledge negation is apply_to(theta_0, -lambda).

        With inplace=True the arrays of params are updated and params is
        returned; otherwise untouched parameters are shared and changed ones
        are new arrays.
        """
        scale = _check_lambda(scale, "scale")
        missing = sorted(set(self.deltas) - set(params))
        if missing:
            raise ValueError(f"task vector has parameters the model lacks: {', '.join(missing[:5])}")
        out = params if inplace else dict(params)
        for name, delta in self.deltas.items():
            base = params[name]
            if base.shape != delta.shape:
                raise ValueError(f"parameter {name}: model shape {base.shape} != task vector shape {delta.shape}")
            target = base if inplace else np.empty(base.shape, np.float32)
            _core.axpby(target, _f32(base), delta, 1.0, scale)
            out[name] = target
        return out

    def negate_into(self, original: dict, negation_lambda: float = 1.0) -> dict:
        """theta_unlearned = theta_original - lambda * tau (new arrays where tau is nonzero)."""
        return self.apply_to(original, -_check_lambda(negation_lambda, "negation_lambda"))

    # ------------------------------------------------------------------
    # statistics and files

    def norm(self) -> float:
        return math.sqrt(sum(_core.sum_squares(delta) for delta in self.deltas.values()))

    def num_parameters(self) -> int:
        return int(sum(delta.size for delta in self.deltas.values()))

    def save(self, path) -> None:
        """Write the deltas as one safetensors file, atomically."""
        from safetensors.numpy import save

        atomic_write_bytes(Path(path), save(self.deltas, metadata={"format": "skupy-task-vector"}))

    @classmethod
    def load(cls, path) -> "TaskVector":
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task vector file not found: {path}")
        try:
            deltas = load_file(os.fspath(path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"cannot read task vector {path}: {error}") from error
        for name, delta in deltas.items():
            if delta.dtype != np.float32:
                raise ValueError(f"task vector {path}: tensor {name} has dtype {delta.dtype}, expected float32")
        return cls(deltas)


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
