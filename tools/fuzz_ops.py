"""Fuzz the op functions of skupy._core with hostile arrays and scalars.

Each input picks one op and builds a valid call from small fuzzer-chosen
dimensions. It then breaks a few arguments with fuzz_common.break_array and
break_scalar: another dtype or byte order, another shape, an empty dimension,
a non-contiguous, unaligned or read-only view, memory shared with another
argument, NaN or huge values, token ids out of range, or no array at all.

The op may return or raise ValueError, TypeError or, for a number too large
to convert, OverflowError. Any other exception is reported, and so are a
crash, a change to an array the op must not write, and an output of the wrong
dtype. Run it under tools/sanitize.sh's AddressSanitizer build to catch memory
errors that do not crash.

libFuzzer receives no coverage of the C code, because the extension is built
with gcc and without -fsanitize=fuzzer. The harness's own branches are
instrumented instead, which steers libFuzzer towards new kinds of calls.

    python tools/fuzz_ops.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import sys

import numpy as np

import fuzz_common
from fuzz_common import UnexpectedBehavior, break_array, break_scalar, pick_float, pick_int

import atheris

from skupy import _core

# OverflowError is what CPython's argument parsing raises for an int or float too
# large for a C int or double, as in float(10**400).
ALLOWED_ERRORS = (ValueError, TypeError, OverflowError)

# OpenMP threads per op: two, so that the threaded loops split their work.
FUZZ_THREADS = 2


class Call:
    """One op call under construction: its keyword arguments and which of them the op may write."""

    def __init__(self, op: str, kwargs: dict, written=(), int_args=()):
        self.op = op
        self.kwargs = kwargs
        self.written = set(written)
        self.int_args = set(int_args)


@atheris.instrument_func
def f32(provider: atheris.FuzzedDataProvider, *shape) -> np.ndarray:
    """Return a float32 array of shape with small random values (all elements set)."""
    seed = provider.ConsumeIntInRange(0, 255)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ids(provider: atheris.FuzzedDataProvider, limit: int, *shape) -> np.ndarray:
    seed = provider.ConsumeIntInRange(0, 255)
    return np.random.default_rng(seed).integers(0, max(limit, 1), shape).astype(np.int32)


@atheris.instrument_func
def dim(provider: atheris.FuzzedDataProvider) -> int:
    """Return a dimension: mostly 1 to 6, sometimes up to 40 so that threaded loops split work."""
    if provider.ConsumeProbability() < 0.9:
        return provider.ConsumeIntInRange(1, 6)
    return provider.ConsumeIntInRange(7, 40)


@atheris.instrument_func
def build_call(provider: atheris.FuzzedDataProvider) -> Call:
    """Return a valid call of a fuzzer-chosen op."""
    op = provider.PickValueInList(OPS)
    N, C, V, OC = dim(provider), dim(provider), dim(provider), dim(provider)
    B, T, Tk = dim(provider) % 3 + 1, dim(provider), dim(provider)
    NKV, group, HS = provider.ConsumeIntInRange(1, 3), provider.ConsumeIntInRange(1, 3), 2 * dim(provider)
    NH = NKV * group

    if op == "embedding_forward":
        return Call(op, dict(tokens=ids(provider, V, N), wte=f32(provider, V, C)))

    if op == "embedding_backward":
        kwargs = dict(dout=f32(provider, N, C), tokens=ids(provider, V, N), vocab_size=V)
        if provider.ConsumeBool():
            kwargs["dwte"] = f32(provider, V, C)
        return Call(op, kwargs, written={"dwte"}, int_args={"vocab_size"})

    if op == "linear_forward":
        kwargs = dict(inp=f32(provider, N, C), w=f32(provider, OC, C))
        if provider.ConsumeBool():
            kwargs["bias"] = f32(provider, OC)
        return Call(op, kwargs)

    if op == "linear_backward":
        kwargs = dict(dout=f32(provider, N, OC), inp=f32(provider, N, C), w=f32(provider, OC, C),
                      need_bias_grad=provider.ConsumeBool())
        for name, shape in (("dinp", (N, C)), ("dw", (OC, C)), ("dbias", (OC,))):
            if provider.ConsumeBool():
                kwargs[name] = f32(provider, *shape)
        return Call(op, kwargs, written={"dinp", "dw", "dbias"})

    if op == "layernorm_forward":
        b = f32(provider, C) if provider.ConsumeBool() else None
        return Call(op, dict(inp=f32(provider, N, C), w=f32(provider, C), b=b, eps=1e-5))

    if op == "layernorm_backward":
        inp, w = f32(provider, N, C), f32(provider, C)
        _out, mean, rstd = _core.layernorm_forward(inp, w, None, 1e-5)
        kwargs = dict(dout=f32(provider, N, C), inp=inp, w=w, mean=mean, rstd=rstd,
                      need_bias_grad=provider.ConsumeBool())
        for name, shape in (("dinp", (N, C)), ("dw", (C,)), ("db", (C,))):
            if provider.ConsumeBool():
                kwargs[name] = f32(provider, *shape)
        return Call(op, kwargs, written={"dinp", "dw", "db"})

    if op == "rmsnorm_forward":
        return Call(op, dict(inp=f32(provider, N, C), w=f32(provider, C), eps=1e-6))

    if op == "rmsnorm_backward":
        inp, w = f32(provider, N, C), f32(provider, C)
        _out, rstd = _core.rmsnorm_forward(inp, w, 1e-6)
        kwargs = dict(dout=f32(provider, N, C), inp=inp, w=w, rstd=rstd)
        for name, shape in (("dinp", (N, C)), ("dw", (C,))):
            if provider.ConsumeBool():
                kwargs[name] = f32(provider, *shape)
        return Call(op, kwargs, written={"dinp", "dw"})

    if op in ("rope_forward", "rope_backward"):
        first = "x" if op == "rope_forward" else "dout"
        return Call(op, {first: f32(provider, N, NH, HS), "cos": f32(provider, N, HS // 2),
                         "sin": f32(provider, N, HS // 2), "interleaved": provider.ConsumeBool()})

    if op == "attention_forward":
        kwargs = dict(q=f32(provider, B, T, NH, HS), k=f32(provider, B, Tk, NKV, HS), v=f32(provider, B, Tk, NKV, HS))
        if provider.ConsumeBool():
            kwargs["key_mask"] = ids(provider, 2, B, Tk)
        if provider.ConsumeBool():
            kwargs["q_offset"] = pick_int(provider, 0, 8)
        if provider.ConsumeBool():
            kwargs["scale"] = pick_float(provider)
        return Call(op, kwargs, int_args={"q_offset"})

    if op == "attention_backward":
        q, k, v = f32(provider, B, T, NH, HS), f32(provider, B, T, NKV, HS), f32(provider, B, T, NKV, HS)
        _out, att = _core.attention_forward(q, k, v)
        kwargs = dict(dout=f32(provider, B, T, NH, HS), att=att, q=q, k=k, v=v)
        for name, shape in (("dq", q.shape), ("dk", k.shape), ("dv", v.shape)):
            if provider.ConsumeBool():
                kwargs[name] = f32(provider, *shape)
        return Call(op, kwargs, written={"dq", "dk", "dv"})
    if op.endswith("_forward") and op.split("_forward")[0] in POINTWISE:
        return Call(op, dict(inp=f32(provider, N, C)))
    if op.endswith("_backward") and op.split("_backward")[0] in POINTWISE:
        kwargs = dict(dout=f32(provider, N, C), inp=f32(provider, N, C))
        if provider.ConsumeBool():
            kwargs["dinp"] = f32(provider, N, C)
        return Call(op, kwargs, written={"dinp"})

    if op == "swiglu_forward":
        return Call(op, dict(gate=f32(provider, N, C), up=f32(provider, N, C)))

    if op == "swiglu_backward":
        kwargs = dict(dout=f32(provider, N, C), gate=f32(provider, N, C), up=f32(provider, N, C))
        for name in ("dgate", "dup"):
            if provider.ConsumeBool():
                kwargs[name] = f32(provider, N, C)
        return Call(op, kwargs, written={"dgate", "dup"})

    if op in ("crossentropy_forward", "crossentropy_backward"):
        kwargs = dict(logits=f32(provider, N, V), targets=ids(provider, V, N), weights=f32(provider, N))
        if op == "crossentropy_forward":
            return Call(op, kwargs)
        kwargs["scale"] = pick_float(provider)
        if provider.ConsumeBool():
            kwargs["out"] = kwargs["logits"] if provider.ConsumeBool() else f32(provider, N, V)
        return Call(op, kwargs, written={"out"})

    if op in ("kl_forward", "kl_backward"):
        kwargs = dict(logits=f32(provider, N, V), ref_logits=f32(provider, N, V), weights=f32(provider, N),
                      reverse=provider.ConsumeBool())
        if op == "kl_forward":
            return Call(op, kwargs)
        kwargs["scale"] = pick_float(provider)
        if provider.ConsumeBool():
            kwargs["out"] = kwargs["logits"] if provider.ConsumeBool() else f32(provider, N, V)
        return Call(op, kwargs, written={"out"})

    if op == "adamw_update":
        kwargs = dict(param=f32(provider, N, C), grad=f32(provider, N, C), m=f32(provider, N, C),
                      v=np.abs(f32(provider, N, C)), lr=pick_float(provider), beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.01, step=pick_int(provider, 1, 10))
        for name in ("beta1", "beta2", "eps", "weight_decay"):
            if provider.ConsumeProbability() < 0.2:
                kwargs[name] = pick_float(provider)
        return Call(op, kwargs, written={"param", "m", "v"}, int_args={"step"})

    if op == "sum_squares":
        return Call(op, dict(x=f32(provider, N, C)))

    if op == "scale_inplace":
        return Call(op, dict(x=f32(provider, N, C), s=pick_float(provider)), written={"x"})

    if op == "axpby":
        x, y = f32(provider, N, C), f32(provider, N, C)
        out = provider.PickValueInList([x, y, f32(provider, N, C)])
        return Call(op, dict(out=out, x=x, y=y, a=pick_float(provider), b=pick_float(provider)), written={"out"})

    if op == "lora_merge":
        R = dim(provider)
        return Call(op, dict(weight=f32(provider, OC, C), lora_A=f32(provider, R, C), lora_B=f32(provider, OC, R),
                             scale=pick_float(provider)), written={"weight"})

    if op == "set_num_threads":
        return Call(op, dict(n=pick_int(provider, 1, 4)), int_args={"n"})
    raise AssertionError(f"no builder for {op}")


POINTWISE = ("gelu_tanh", "gelu_exact", "relu", "silu")
OPS = sorted(
    ["embedding_forward", "embedding_backward", "linear_forward", "linear_backward", "layernorm_forward",
     "layernorm_backward", "rmsnorm_forward", "rmsnorm_backward", "rope_forward", "rope_backward",
     "attention_forward", "attention_backward", "swiglu_forward", "swiglu_backward", "crossentropy_forward",
     "crossentropy_backward", "kl_forward", "kl_backward", "adamw_update", "sum_squares", "scale_inplace", "axpby",
     "lora_merge", "set_num_threads"]
    + [f"{name}_{direction}" for name in POINTWISE for direction in ("forward", "backward")])

# Positional order of each op's arguments, from the op's signature.
POSITIONAL = {
    "lora_merge": ("weight", "lora_A", "lora_B", "scale"),
    "set_num_threads": ("n",),
}


@atheris.instrument_func
def break_call(provider: atheris.FuzzedDataProvider, call: Call) -> None:
    names = list(call.kwargs)
    for _ in range(provider.ConsumeIntInRange(0, 3)):
        name = provider.PickValueInList(names)
        value = call.kwargs[name]
        if isinstance(value, np.ndarray):
            others = [item for key, item in call.kwargs.items() if key != name]
            call.kwargs[name] = break_array(provider, value, others)
        else:
            call.kwargs[name] = break_scalar(provider, name in call.int_args)
    if provider.ConsumeProbability() < 0.05:
        call.kwargs["unknown_argument"] = 1
    if provider.ConsumeProbability() < 0.05 and names:
        del call.kwargs[provider.PickValueInList(names)]


def same_data(a, b) -> bool:
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def add_allowed_aliases(call: Call) -> None:
    """Mark as written the inputs that an op documents it may write through an output alias.

    axpby's out may be x or y, and the out of the loss backward ops may be
    logits. The ops must reject any other input that shares memory with an output.
    """
    aliases = {"axpby": ("out", ("x", "y")), "crossentropy_backward": ("out", ("logits",)),
               "kl_backward": ("out", ("logits",))}
    if call.op not in aliases:
        return
    output, inputs = aliases[call.op]
    for name in inputs:
        if same_data(call.kwargs.get(output), call.kwargs.get(name)):
            call.written.add(name)


def snapshot(call: Call) -> dict:
    """Return a copy of the bytes of every array argument that the op must leave unchanged."""
    add_allowed_aliases(call)
    return {name: (value, value.tobytes()) for name, value in call.kwargs.items()
            if isinstance(value, np.ndarray) and name not in call.written}


def check_unchanged(call: Call, copies: dict) -> None:
    for name, (value, before) in copies.items():
        if value.tobytes() != before:
            raise UnexpectedBehavior(f"{call.op} changed its input {name}, which it must not write")


def check_outputs(call: Call, result) -> None:
    outputs = result if isinstance(result, tuple) else (result,)
    for output in outputs:
        if isinstance(output, np.ndarray) and (output.dtype != np.float32 or not output.flags.c_contiguous):
            raise UnexpectedBehavior(f"{call.op} returned a {output.dtype} array, C-contiguous="
                                     f"{output.flags.c_contiguous}")


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    call = build_call(provider)
    if provider.ConsumeProbability() < 0.85:
        break_call(provider, call)
    copies = snapshot(call)
    function = getattr(_core, call.op)
    positional = POSITIONAL.get(call.op)
    try:
        if positional is not None:
            args = [call.kwargs.get(name) for name in positional]
            result = function(*args)
        else:
            result = function(**call.kwargs)
    except ALLOWED_ERRORS:
        check_unchanged(call, copies)
        return
    finally:
        if call.op == "set_num_threads":
            _core.set_num_threads(FUZZ_THREADS)
    check_unchanged(call, copies)
    check_outputs(call, result)


if __name__ == "__main__":
    _core.set_num_threads(FUZZ_THREADS)
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
