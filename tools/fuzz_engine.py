"""Fuzz skupy._core.Engine: hostile configs, then a sequence of method calls with hostile arguments.

Each input builds a config dict for Engine(): a valid small model (LLaMA-,
GPT-2- or OPT-like, with or without LoRA, tied head, recomputation) with a
few entries replaced by edge values (huge, negative, wrong types, unknown
names). When Engine() accepts it and its parameters are small, the input then
makes up to six calls. They are forward, logits, hidden, cross_entropy,
kl_div, backward, generate, set_inv_freq and param_specs, with valid
arguments of which a few are broken by fuzz_common.break_array and
break_scalar.

Allowed outcomes: a result, ValueError, TypeError, OverflowError (a number
too large for a C int), RuntimeError (a call out of order, such as backward
before a loss), and MemoryError from forward and generate, which document it
for batches too large to allocate. Anything else is reported, and so are a
crash (run under tools/sanitize.sh's AddressSanitizer build to catch silent
memory errors), a hang, and results that change when a call is repeated with
the same inputs.

    python tools/fuzz_engine.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import sys

import numpy as np

import fuzz_common
from fuzz_common import UnexpectedBehavior, break_array, break_scalar, pick_float, pick_int

import atheris

from skupy import _core

ALLOWED_ERRORS = (ValueError, TypeError, OverflowError, RuntimeError)
# Engine methods that document MemoryError for a batch too large to allocate.
MEMORY_ERROR_METHODS = ("forward", "generate")
# Parameter elements above which the harness does not allocate parameters.
MAX_PARAM_ELEMENTS = 200_000
FUZZ_THREADS = 2

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_KEYS = ("vocab_size", "hidden_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "max_position_embeddings", "position_offset", "norm", "activation", "position",
               "rope_interleaved", "tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias",
               "pre_norm", "final_norm", "norm_eps", "lora_rank", "lora_scale", "lora_targets", "recompute")


@atheris.instrument_func
def valid_config(provider: atheris.FuzzedDataProvider) -> dict:
    """Return a small config that Engine() accepts."""
    num_kv_heads = provider.ConsumeIntInRange(1, 2)
    num_heads = num_kv_heads * provider.ConsumeIntInRange(1, 2)
    hidden_size = provider.PickValueInList([4, 8, 12])
    position = provider.PickValueInList(["rope", "learned"])
    config = {
        "vocab_size": provider.ConsumeIntInRange(1, 24),
        "hidden_size": hidden_size,
        "num_layers": provider.ConsumeIntInRange(1, 2),
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": 2 * provider.ConsumeIntInRange(1, 3),
        "intermediate_size": provider.ConsumeIntInRange(1, 12),
        "max_position_embeddings": provider.ConsumeIntInRange(1, 12),
        "norm": provider.PickValueInList(["rmsnorm", "layernorm"]),
        "activation": provider.PickValueInList(["swiglu", "gelu_tanh", "gelu", "relu"]),
        "position": position,
        "position_offset": provider.PickValueInList([0, 2]) if position == "learned" else 0,
        "tie_word_embeddings": int(provider.ConsumeBool()),
        "attention_bias": int(provider.ConsumeBool()),
        "attention_out_bias": int(provider.ConsumeBool()),
        "mlp_bias": int(provider.ConsumeBool()),
        "pre_norm": int(provider.ConsumeProbability() < 0.8),
        "final_norm": int(provider.ConsumeProbability() < 0.8),
        "norm_eps": 1e-5,
        "recompute": int(provider.ConsumeBool()),
        "rope_interleaved": int(provider.ConsumeBool()),
    }
    if provider.ConsumeProbability() < 0.2:
        config["embed_dim"] = provider.PickValueInList([2, 4, 6])
    if provider.ConsumeBool():
        config["lora_rank"] = provider.ConsumeIntInRange(1, 3)
        config["lora_scale"] = pick_float(provider) if provider.ConsumeProbability() < 0.2 else 2.0
        config["lora_targets"] = [name for name in LINEAR_NAMES if provider.ConsumeBool()]
    return config


@atheris.instrument_func
def break_config(provider: atheris.FuzzedDataProvider, config: dict) -> None:
    for _ in range(provider.ConsumeIntInRange(1, 3)):
        key = provider.PickValueInList(list(CONFIG_KEYS) + ["unknown"])
        kind = provider.ConsumeIntInRange(0, 5)
        if kind == 0:
            config[key] = pick_int(provider, -2, 40)
        elif kind == 1:
            config[key] = pick_float(provider)
        elif kind == 2:
            config[key] = provider.PickValueInList(["rmsnorm", "swiglu", "rope", "", "x" * 300, None, [], {}])
        elif kind == 3:
            config[key] = provider.PickValueInList([["q_proj", "q_proj"], ["nope"], [1], "q_proj", (), None])
        elif kind == 4:
            config[key] = provider.PickValueInList(list(fuzz_common.INTERESTING_INTS) + [10**40])
        else:
            config.pop(key, None)


def make_params(specs: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    params = []
    for name, shape in specs:
        if "norm" in name:
            params.append(np.ones(shape, np.float32))
        else:
            params.append((rng.standard_normal(shape) * 0.3).astype(np.float32))
    return params


class Session:
    """One Engine with its parameters and the arguments of its last successful forward."""

    def __init__(self, engine, config: dict, specs: list, params: list):
        self.engine = engine
        self.config = config
        self.specs = specs
        self.params = params
        # Engine() accepted these entries, so each is an int (or a bool) in its valid range.
        self.vocab_size = int(config["vocab_size"])
        self.max_positions = int(config["max_position_embeddings"])
        head_dim = config.get("head_dim")
        if head_dim is None:
            head_dim = int(config["hidden_size"]) // int(config["num_heads"])
        self.head_dim = int(head_dim)
        self.last_forward = None  # (kwargs, logits) of the last forward that succeeded
        self.engine_batch = None  # (B, T) of the logits in the engine


def token_batch(provider: atheris.FuzzedDataProvider, session: Session, B: int, T: int) -> np.ndarray:
    seed = provider.ConsumeIntInRange(0, 255)
    return np.random.default_rng(seed).integers(0, session.vocab_size, (B, T)).astype(np.int32)


def maybe_break(provider: atheris.FuzzedDataProvider, kwargs: dict, int_names=()) -> None:
    """Break up to two arguments of kwargs, the params list included."""
    if not kwargs or provider.ConsumeProbability() < 0.6:
        return
    for _ in range(provider.ConsumeIntInRange(1, 2)):
        name = provider.PickValueInList(list(kwargs))
        value = kwargs[name]
        if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            value = list(value)
            if provider.ConsumeProbability() < 0.2:
                value = value[:-1] if provider.ConsumeBool() else value + value[:1]
            else:
                index = provider.ConsumeIntInRange(0, len(value) - 1)
                if isinstance(value[index], np.ndarray):
                    value[index] = break_array(provider, value[index], value[:index])
                else:
                    value[index] = None
            kwargs[name] = value
        elif isinstance(value, np.ndarray):
            others = [item for key, item in kwargs.items() if key != name and isinstance(item, np.ndarray)]
            kwargs[name] = break_array(provider, value, others)
        else:
            kwargs[name] = break_scalar(provider, name in int_names)


@atheris.instrument_func
def next_call(provider: atheris.FuzzedDataProvider, session: Session) -> tuple:
    """Return (method name, kwargs) of a mostly valid call."""
    method = provider.PickValueInList(["forward", "forward", "logits", "hidden", "cross_entropy", "kl_div",
                                       "backward", "generate", "set_inv_freq", "param_specs", "repeat_forward"])
    B = provider.ConsumeIntInRange(1, 3)
    T = provider.ConsumeIntInRange(1, max(1, min(session.max_positions, 8)))
    if method in ("forward", "repeat_forward"):
        tokens = token_batch(provider, session, B, T)
        mask = np.ones((B, T), np.int32)
        if provider.ConsumeBool():
            mask[:, :provider.ConsumeIntInRange(0, T)] = 0
        positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
        kwargs = dict(params=session.params, tokens=tokens, positions=positions, mask=mask,
                      use_lora=provider.ConsumeBool())
        return method, kwargs
    if method in ("logits", "hidden", "param_specs"):
        return method, {}
    # Loss calls must match the batch of the last forward to get past the shape checks.
    B, T = session.engine_batch or (B, T)
    if method == "cross_entropy":
        kwargs = dict(targets=token_batch(provider, session, B, T), weights=np.ones((B, T), np.float32))
        if provider.ConsumeBool():
            kwargs["grad_scale"] = pick_float(provider)
        return method, kwargs
    if method == "kl_div":
        seed = provider.ConsumeIntInRange(0, 255)
        ref = np.random.default_rng(seed).standard_normal((B, T, session.vocab_size)).astype(np.float32)
        kwargs = dict(ref_logits=ref, weights=np.ones((B, T), np.float32), reverse=provider.ConsumeBool())
        if provider.ConsumeBool():
            kwargs["grad_scale"] = pick_float(provider)
        return method, kwargs
    if method == "backward":
        grads = [np.zeros(shape, np.float32) if provider.ConsumeProbability() < 0.8 else None
                 for _name, shape in session.specs]
        return method, dict(params=session.params, grads=grads)
    if method == "generate":
        Tp = provider.ConsumeIntInRange(1, max(1, session.max_positions - 1))
        tokens = token_batch(provider, session, B, Tp)
        mask = np.ones((B, Tp), np.int32)
        mask[:, :provider.ConsumeIntInRange(0, Tp - 1)] = 0
        kwargs = dict(params=session.params, tokens=tokens, mask=mask,
                      max_new_tokens=provider.ConsumeIntInRange(0, max(1, session.max_positions - Tp)),
                      temperature=provider.PickValueInList([0.0, 0.7, 1.0]), top_k=provider.ConsumeIntInRange(0, 5),
                      top_p=provider.PickValueInList([1.0, 0.5, 0.95]), seed=provider.ConsumeIntInRange(0, 9),
                      pad_id=0, use_lora=provider.ConsumeBool())
        if provider.ConsumeBool():
            kwargs["stop_ids"] = token_batch(provider, session, 1, 2)[0]
        return method, kwargs
    return method, dict(inv_freq=np.ones(max(session.head_dim // 2, 1), np.float32))


def call_method(session: Session, method: str, kwargs: dict):
    engine = session.engine
    if method == "set_inv_freq":
        return engine.set_inv_freq(*kwargs.values())
    return getattr(engine, method)(**kwargs)


def check_result(session: Session, method: str, kwargs: dict, result) -> None:
    if method == "set_inv_freq":
        session.last_forward = None  # new RoPE frequencies change every later forward
    elif method == "forward":
        logits = session.engine.logits()
        tokens = kwargs["tokens"]
        if logits.shape != tokens.shape + (session.vocab_size,):
            raise UnexpectedBehavior(f"logits shape {logits.shape} for tokens {tokens.shape}")
        session.engine_batch = tokens.shape
        session.last_forward = (kwargs, logits)
    elif method == "generate":
        new_tokens, lengths = result
        if new_tokens.shape != (kwargs["tokens"].shape[0], kwargs["max_new_tokens"]):
            raise UnexpectedBehavior(f"generate returned shape {new_tokens.shape}")
        if new_tokens.size and (new_tokens.min() < 0 or new_tokens.max() >= session.vocab_size):
            raise UnexpectedBehavior("generate returned a token id outside the vocabulary")
        if lengths.min() < 0 or lengths.max() > kwargs["max_new_tokens"]:
            raise UnexpectedBehavior(f"generate returned lengths {lengths.tolist()}")
        again = session.engine.generate(**kwargs)
        if not (np.array_equal(again[0], new_tokens) and np.array_equal(again[1], lengths)):
            raise UnexpectedBehavior("generate gave different tokens for the same inputs and seed")


def repeat_last_forward(session: Session) -> None:
    """Run the last successful forward again: buffers reused since must not change its logits."""
    if session.last_forward is None:
        return
    kwargs, logits = session.last_forward
    session.engine.forward(**kwargs)
    again = session.engine.logits()
    if not np.array_equal(again, logits, equal_nan=True):
        raise UnexpectedBehavior("forward gave different logits for the same inputs after other calls")
    session.engine_batch = kwargs["tokens"].shape


def prepare_backward(provider: atheris.FuzzedDataProvider, session: Session) -> None:
    """Run a valid forward and a loss with grad_scale, the calls backward needs before it."""
    kwargs = dict(params=session.params, tokens=token_batch(provider, session, 2, 1),
                  positions=np.zeros((2, 1), np.int32), mask=np.ones((2, 1), np.int32))
    session.engine.forward(**kwargs)
    session.engine_batch = (2, 1)
    targets = token_batch(provider, session, 2, 1)
    session.engine.cross_entropy(targets, np.ones((2, 1), np.float32), pick_float(provider))


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    config = valid_config(provider)
    if provider.ConsumeProbability() < 0.5:
        break_config(provider, config)
    try:
        engine = _core.Engine(config)
        specs = engine.param_specs()
    except (ValueError, TypeError, OverflowError):
        return
    if sum(int(np.prod(shape)) for _name, shape in specs) > MAX_PARAM_ELEMENTS:
        return
    params = make_params(specs, provider.ConsumeIntInRange(0, 255))
    session = Session(engine, config, specs, params)

    for _ in range(provider.ConsumeIntInRange(1, 6)):
        method, kwargs = next_call(provider, session)
        if method == "repeat_forward":
            repeat_last_forward(session)
            continue
        if method == "backward" and provider.ConsumeProbability() < 0.7:
            try:
                prepare_backward(provider, session)
            except ValueError:
                pass  # a fuzzed grad_scale that is not finite
        maybe_break(provider, kwargs, int_names={"max_new_tokens", "top_k", "seed", "pad_id"})
        try:
            result = call_method(session, method, kwargs)
        except ALLOWED_ERRORS:
            continue
        except MemoryError:
            if method not in MEMORY_ERROR_METHODS:
                raise
            continue
        check_result(session, method, kwargs, result)


if __name__ == "__main__":
    _core.set_num_threads(FUZZ_THREADS)
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
