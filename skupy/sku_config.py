"""Settings of one SKU run: data, loss weights, optimizer, LoRA and negation.

The field names follow the SKU paper (Liu et al. 2024, "Towards Safer Large
Language Models through Machine Unlearning") and its published code. The
loss of one step is

    bad_weight * GD + random_weight * RD + normal_weight * PD

(epsilon 1, 2 and 3 in the paper), optimized with AdamW and a learning rate
that decays linearly to 0 over max_unlearn_steps. The unlearned model is
theta_0 - negation_lambda * (theta_harmful - theta_0).

A config can start from a preset (see PRESETS), be read from YAML or JSON,
and be changed with "key=value" overrides. Every way of building one
validates it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import yaml

from .batching import TEMPLATES
from .config import LORA_TARGETS

ALIASES = {"K": "num_random_answers"}
PRESET_KEY = "preset"
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
_NONE_WORDS = ("none", "null", "")


@dataclass
class SKUConfig:
    """Settings of one SKU run.

    The defaults are the paper's published settings for OPT-2.7B (epsilon
    2.5 / 2.5 / 1, lr 2e-4, 1000 steps, batch 2, K = 5, full fine-tuning),
    except ``model``, which names the small model skupy ships. That
    combination is slow on a CPU; the "smollm2-135m" preset is sized for one.
    """

    model: str = "smollm2-135m-instruct"  # model name known to skupy, or a path to a checkpoint
    data_dir: Optional[str] = None        # None: the SKUPY_DATA_DIR environment variable
    template: str = "sku"                 # "sku" (### Question: ... ### Answer: ...) or "chat" (the chat template)
    max_length: int = 512                 # tokens per training sequence, with answers truncated to fit
    bad_weight: float = 2.5               # epsilon 1, weight of guided distortion (GD)
    random_weight: float = 2.5            # epsilon 2, weight of random disassociation (RD)
    normal_weight: float = 1.0            # epsilon 3, weight of preservation divergence (PD)
    num_random_answers: int = 5           # K: random harmful answers per harmful question (files may say K)
    batch_size: int = 2                   # harmful pairs (and normal pairs) per step
    max_unlearn_steps: int = 1000         # optimizer steps
    lr: float = 2e-4                      # peak learning rate, decayed linearly to 0 without warm-up
    weight_decay: float = 0.01            # torch.optim.AdamW's default, which the published code used
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.0                # maximum global gradient norm; 0 disables clipping
    lora: bool = False                    # train LoRA adapters instead of all weights
    lora_rank: int = 32                   # r
    lora_alpha: float = 16.0              # LoRA scale is lora_alpha / lora_rank
    lora_targets: tuple = ("q_proj", "v_proj")
    negation_lambda: float = 1.0          # lambda, the scale of the negated task vector
    seed: int = 0                         # data split, batch order and random answers
    checkpoint_every: int = 0             # steps between checkpoints; 0 saves only at the end
    log_every: int = 10                   # steps between log lines

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = _split_names(self.lora_targets)
        elif isinstance(self.lora_targets, list):
            self.lora_targets = tuple(self.lora_targets)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its value."""
        errors = _validation_errors(self)
        if errors:
            raise ValueError(f"invalid SKUConfig: {errors[0]}")

    # -- conversion -------------------------------------------------------

    def to_dict(self) -> dict:
        """Return the fields as plain Python values (lists for tuples), ready for YAML or JSON."""
        values = dataclasses.asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "SKUConfig":
        """Build a config from a mapping of field names (or "K") to values.

        A "preset" key starts from that preset; the other keys override it.
        String values are converted to the field's type, as for apply_overrides.
        Unknown keys raise ValueError listing the valid ones.
        """
        values = dict(values)
        preset = values.pop(PRESET_KEY, None)
        base = cls.from_preset(preset) if preset is not None else cls()
        changes = {}
        for key, value in values.items():
            name = _canonical_name(key)
            if name in changes:
                raise ValueError(f"SKUConfig field {name!r} is given twice (as {name!r} and as an alias)")
            changes[name] = _convert(name, value)
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "SKUConfig":
        """Read a config from a .yaml, .yml or .json file holding one mapping (see from_dict).

        Raises FileNotFoundError for a missing file and ValueError naming the file
        for text that is not UTF-8, YAML or JSON, and for invalid values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SKU config file not found: {path}")
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"{path}: unsupported config file type {suffix!r}; use .yaml, .yml or .json")
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: invalid config file: {error}") from None
        except RecursionError:
            raise ValueError(f"{path}: invalid config file: nested too deeply") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must hold a mapping of field names to values, "
                             f"found {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def to_file(self, path: Union[str, Path]) -> None:
        """Write all fields to a .yaml, .yml or .json file, which from_file reads back unchanged."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ValueError(f"{path}: unsupported config file type {suffix!r}; use .yaml, .yml or .json")
        path.write_text(text, encoding="utf-8")

    def apply_overrides(self, overrides: Iterable[str]) -> "SKUConfig":
        """Return a copy with "key=value" overrides applied, such as ["lr=1e-4", "lora_rank=8"].

        Values are converted to the field's type: booleans accept
        true/false/yes/no/on/off/1/0, optional strings accept none or null,
        and lora_targets takes a comma-separated list. "K" names
        num_random_answers. The result is validated.
        """
        changes = {}
        for item in overrides:
            key, separator, text = item.partition("=")
            if not separator:
                raise ValueError(f"override {item!r} must have the form key=value")
            name = _canonical_name(key.strip())
            changes[name] = _convert(name, text.strip())
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **changes) -> "SKUConfig":
        """Build the preset called ``name`` with ``changes`` applied on top."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown SKU preset {_short_repr(name)}; available: {', '.join(PRESETS)}")
        values = dict(PRESETS[name]["values"])
        values.update(changes)
        return cls(**values)


def _field_types() -> dict:
    return typing.get_type_hints(SKUConfig)


def field_names() -> list:
    """Return the names of SKUConfig's fields in declaration order."""
    return [item.name for item in dataclasses.fields(SKUConfig)]


def _canonical_name(key: str) -> str:
    name = ALIASES.get(key, key)
    if name not in _field_types():
        raise ValueError(f"unknown SKUConfig key {key!r}; valid keys: {', '.join(field_names())}, "
                         f"{', '.join(ALIASES)} (alias of {', '.join(ALIASES.values())}) and {PRESET_KEY}")
    return name


def _short_repr(value) -> str:
    """Return repr(value) cut to a few elements per level, for error messages.

    A YAML file can alias one list many times over, and the full repr of such
    a value grows exponentially with the number of anchors.
    """
    return reprlib.repr(value)


def _split_names(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _convert(name: str, value):
    """Convert ``value`` to the type of field ``name``. Strings are parsed and other values checked."""
    kind = _field_types()[name]
    optional = typing.get_origin(kind) is Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ValueError(f"{name} must be true or false, got {_short_repr(value)}")

    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _parse_number(name, value, "an integer")
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{name} must be an integer, got {_short_repr(value)}")
        return int(number)

    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _parse_number(name, value, "a number")

    if kind is tuple:
        if isinstance(value, str):
            return _split_names(value)
        if isinstance(value, (list, tuple)) and all(isinstance(entry, str) for entry in value):
            return tuple(value)
        raise ValueError(f"{name} must be a list of names or a comma-separated string, got {_short_repr(value)}")

    if kind is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError(f"{name} must be a string, got {_short_repr(value)}")

    raise TypeError(f"SKUConfig field {name} has a type ({kind}) that _convert does not handle")


def _parse_number(name: str, value, expected: str) -> float:
    # YAML 1.1 reads "2e-4" as a string, so numbers in files can arrive as text.
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be {expected}, got {_short_repr(value)}")


def _validation_errors(config: SKUConfig) -> list:
    """Return a message for each invalid field of ``config``, in field order."""
    errors = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            errors.append(message)

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    check(isinstance(config.model, str) and config.model != "", f"model={config.model!r} must be a non-empty string")
    check(config.data_dir is None or isinstance(config.data_dir, str),
          f"data_dir={config.data_dir!r} must be a path string or None")
    check(config.template in TEMPLATES, f"template={config.template!r} must be one of {', '.join(TEMPLATES)}")
    check(is_int(config.max_length) and config.max_length >= 2,
          f"max_length={config.max_length!r} must be an integer >= 2")
    for name in ("bad_weight", "random_weight", "normal_weight"):
        value = getattr(config, name)
        check(is_number(value) and value >= 0, f"{name}={value!r} must be a finite number >= 0")
    check(is_int(config.num_random_answers) and config.num_random_answers >= 1,
          f"num_random_answers (K)={config.num_random_answers!r} must be an integer >= 1")
    check(is_int(config.batch_size) and config.batch_size >= 1,
          f"batch_size={config.batch_size!r} must be an integer >= 1")
    check(is_int(config.max_unlearn_steps) and config.max_unlearn_steps >= 1,
          f"max_unlearn_steps={config.max_unlearn_steps!r} must be an integer >= 1")
    check(is_number(config.lr) and config.lr > 0, f"lr={config.lr!r} must be a finite number > 0")
    check(is_number(config.weight_decay) and config.weight_decay >= 0,
          f"weight_decay={config.weight_decay!r} must be a finite number >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(config, name)
        check(is_number(value) and 0 <= value < 1, f"{name}={value!r} must lie in [0, 1)")
    check(is_number(config.adam_eps) and config.adam_eps > 0, f"adam_eps={config.adam_eps!r} must be a number > 0")
    check(is_number(config.grad_clip) and config.grad_clip >= 0,
          f"grad_clip={config.grad_clip!r} must be a finite number >= 0 (0 disables clipping)")
    check(isinstance(config.lora, bool), f"lora={config.lora!r} must be true or false")
    check(is_int(config.lora_rank) and config.lora_rank >= 1, f"lora_rank={config.lora_rank!r} must be an integer >= 1")
    check(is_number(config.lora_alpha) and config.lora_alpha > 0,
          f"lora_alpha={config.lora_alpha!r} must be a finite number > 0")
    check(isinstance(config.lora_targets, tuple) and len(config.lora_targets) > 0,
          f"lora_targets={config.lora_targets!r} must name at least one layer")
    for target in config.lora_targets if isinstance(config.lora_targets, tuple) else ():
        check(target in LORA_TARGETS, f"lora_targets entry {target!r} must be one of {', '.join(LORA_TARGETS)}")
    check(is_number(config.negation_lambda), f"negation_lambda={config.negation_lambda!r} must be a finite number")
    check(is_int(config.seed) and config.seed >= 0, f"seed={config.seed!r} must be an integer >= 0")
    check(is_int(config.checkpoint_every) and config.checkpoint_every >= 0,
          f"checkpoint_every={config.checkpoint_every!r} must be an integer >= 0 (0 saves only at the end)")
    check(is_int(config.log_every) and config.log_every >= 1, f"log_every={config.log_every!r} must be an integer >= 1")
    return errors


PAPER_SETTINGS = {
    "bad_weight": 2.5,
    "random_weight": 2.5,
    "normal_weight": 1.0,
    "lr": 2e-4,
    "max_unlearn_steps": 1000,
    "batch_size": 2,
    "num_random_answers": 5,
}

# Each preset states which source its numbers follow.
PRESETS = {
    "opt-2.7b": {
        "description": "The paper's published settings for OPT-2.7B: epsilon 2.5 / 2.5 / 1, lr 2e-4, "
                       "1000 steps, batch 2, K = 5, full fine-tuning. max_length 2048 is OPT's context "
                       "length.",
        "values": dict(PAPER_SETTINGS, model="facebook/opt-2.7b", max_length=2048, lora=False),
    },
    "llama2-7b": {
        "description": "The paper's published settings for Llama-2-7B: those of OPT-2.7B with LoRA "
                       "r = 32, alpha = 16 on q_proj and v_proj. max_length 4096 is Llama 2's context length.",
        "values": dict(PAPER_SETTINGS, model="meta-llama/Llama-2-7b-hf", max_length=4096, lora=True,
                       lora_rank=32, lora_alpha=16.0, lora_targets=("q_proj", "v_proj")),
    },
    "llama2-13b": {
        "description": "The published code's settings for Llama-2-13B: those of Llama-2-7B with LoRA "
                       "r = 16, alpha = 8.",
        "values": dict(PAPER_SETTINGS, model="meta-llama/Llama-2-13b-hf", max_length=4096, lora=True,
                       lora_rank=16, lora_alpha=8.0, lora_targets=("q_proj", "v_proj")),
    },
    "reference-code-defaults": {
        "description": "The command-line defaults of the published SKU code, which differ from the "
                       "paper: epsilon 0.5 / 1 / 1, lr 2e-5, 1000 steps, batch 2, K = 5, model "
                       "facebook/opt-1.3b, full fine-tuning.",
        "values": dict(PAPER_SETTINGS, model="facebook/opt-1.3b", bad_weight=0.5, random_weight=1.0,
                       normal_weight=1.0, lr=2e-5, max_length=2048, lora=False),
    },
    # NOTE: the step count, K and lr of this preset are estimates for a run of a few
    # minutes on 2 CPU cores. No measured run has tuned them yet.
    "smollm2-135m": {
        "description": "A small-scale preset for SmolLM2-135M-Instruct on a CPU, not from the paper: "
                       "the paper's loss weights (epsilon 2.5 / 2.5 / 1) and batch 2, with LoRA r = 32, "
                       "alpha = 16 on q_proj and v_proj, K = 3, 80 steps, max_length 128 and the chat "
                       "template. lr 1e-3 is higher than the paper's 2e-4 so that 80 LoRA steps move "
                       "the weights noticeably. NOTE: with epsilon 3 = 1 the PD term dominates on this model "
                       "and the GD loss stops falling; normal_weight=0.2 keeps GD falling.",
        "values": dict(PAPER_SETTINGS, model="smollm2-135m-instruct", template="chat", max_length=128,
                       num_random_answers=3, max_unlearn_steps=80, lr=1e-3, lora=True, lora_rank=32,
                       lora_alpha=16.0, lora_targets=("q_proj", "v_proj"), log_every=5),
    },
}


def describe_presets() -> str:
    """Return one line per preset, "name: description", for help text."""
    return "\n".join(f"{name}: {preset['description']}" for name, preset in PRESETS.items())
