"""Invalid arguments to the op bindings of skupy._core raise, never crash.

Each case starts from a valid call, breaks one argument, and expects a
TypeError or ValueError whose message names that argument.
"""
import numpy as np
import pytest

from skupy import _core

N, C, V = 4, 6, 10
B, T, NH, NKV, HS = 2, 3, 4, 2, 8


def f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


def valid_args():
    """Return op name -> positional arguments of a call that succeeds."""
    tokens = np.array([0, 3, 9, 1], dtype=np.int32)
    targets = np.array([1, 2, 3, 4], dtype=np.int32)
    weights = np.ones(N, dtype=np.float32)
    q, k, v = f32(B, T, NH, HS), f32(B, T, NKV, HS), f32(B, T, NKV, HS)
    _, att = _core.attention_forward(q, k, v)
    _, mean, rstd = _core.layernorm_forward(f32(N, C), f32(C), f32(C), 1e-5)
    return {
        "embedding_forward": (tokens, f32(V, C)),
        "embedding_backward": (f32(N, C), tokens, V),
        "linear_forward": (f32(N, C), f32(5, C), f32(5)),
        "linear_backward": (f32(N, 5), f32(N, C), f32(5, C), True),
        "layernorm_forward": (f32(N, C), f32(C), f32(C), 1e-5),
        "layernorm_backward": (f32(N, C), f32(N, C), f32(C), mean, rstd),
        "rmsnorm_forward": (f32(N, C), f32(C), 1e-6),
        "rmsnorm_backward": (f32(N, C), f32(N, C), f32(C), rstd),
        "rope_forward": (f32(N, NH, HS), f32(N, HS // 2), f32(N, HS // 2)),
        "rope_backward": (f32(N, NH, HS), f32(N, HS // 2), f32(N, HS // 2)),
        "attention_forward": (q, k, v),
        "attention_backward": (f32(B, T, NH, HS), att, q, k, v),
        "gelu_tanh_forward": (f32(N, C),),
        "gelu_tanh_backward": (f32(N, C), f32(N, C)),
        "gelu_exact_forward": (f32(N, C),),
        "gelu_exact_backward": (f32(N, C), f32(N, C)),
        "relu_forward": (f32(N, C),),
        "relu_backward": (f32(N, C), f32(N, C)),
        "silu_forward": (f32(N, C),),
        "silu_backward": (f32(N, C), f32(N, C)),
        "swiglu_forward": (f32(N, C), f32(N, C)),
        "swiglu_backward": (f32(N, C), f32(N, C), f32(N, C)),
        "crossentropy_forward": (f32(N, V), targets, weights),
        "crossentropy_backward": (f32(N, V), targets, weights, 1.0),
        "kl_forward": (f32(N, V), f32(N, V), weights),
        "kl_backward": (f32(N, V), f32(N, V), weights, 1.0),
        "adamw_update": (f32(N, C), f32(N, C), np.zeros((N, C), np.float32),
                         np.zeros((N, C), np.float32), 1e-3, 0.9, 0.999, 1e-8, 0.01, 1),
        "sum_squares": (f32(N, C),),
        "scale_inplace": (f32(N, C), 2.0),
        "axpby": (f32(N, C), f32(N, C), f32(N, C), 1.0, -1.0),
    }


def call_with(op, position, value, **kwargs):
    """Call op with its valid arguments, argument `position` replaced by value."""
    args = list(valid_args()[op])
    if position is not None:
        args[position] = value
    return getattr(_core, op)(*args, **kwargs)


def test_every_valid_call_succeeds():
    for op, args in valid_args().items():
        getattr(_core, op)(*args)


def test_op_table_is_complete():
    """Check that valid_args lists every op binding, so the junk test covers them all."""
    ops = {"embedding", "linear", "layernorm", "rmsnorm", "rope", "attention", "gelu_tanh",
           "gelu_exact", "relu", "silu", "swiglu", "crossentropy", "kl"}
    expected = {f"{op}_{direction}" for op in ops for direction in ("forward", "backward")}
    expected |= {"adamw_update", "sum_squares", "scale_inplace", "axpby"}
    assert set(valid_args()) == expected
    assert expected <= set(dir(_core))


# (op, position of the broken argument, bad value, exception, message pattern)
WRONG_DTYPE = [
    ("embedding_forward", 0, np.array([0, 1], dtype=np.int64), TypeError, "tokens"),
    ("embedding_forward", 1, np.zeros((V, C)), TypeError, "wte"),
    ("linear_forward", 0, np.zeros((N, C)), TypeError, "inp"),
    ("linear_forward", 0, [[1.0] * C] * N, TypeError, "inp"),
    ("linear_forward", 2, np.zeros(5, np.float16), TypeError, "bias"),
    ("layernorm_forward", 1, np.ones(C, np.int32), TypeError, "w"),
    ("attention_forward", 1, np.zeros((B, T, NKV, HS)), TypeError, "k"),
    ("crossentropy_forward", 1, np.zeros(N, np.float32), TypeError, "targets"),
    ("crossentropy_forward", 2, np.ones(N), TypeError, "weights"),
    ("kl_forward", 1, np.zeros((N, V), np.int32), TypeError, "ref_logits"),
    ("adamw_update", 1, np.zeros((N, C)), TypeError, "grad"),
    ("sum_squares", 0, None, TypeError, "x"),
    ("axpby", 2, 3.0, TypeError, "y"),
    ("gelu_tanh_forward", 0, np.zeros((N, C), np.float64), TypeError, "inp"),
    ("swiglu_backward", 2, np.zeros((N, C), np.int32), TypeError, "up"),
]

WRONG_SHAPE = [
    ("embedding_forward", 0, np.zeros((2, 2), np.int32), ValueError, "tokens"),
    ("embedding_backward", 1, np.zeros(N + 1, np.int32), ValueError, "tokens"),
    ("linear_forward", 1, f32(5, C + 1), ValueError, "w"),
    ("linear_forward", 2, f32(6), ValueError, "bias"),
    ("linear_backward", 2, f32(5, C + 1), ValueError, "w"),
    ("layernorm_forward", 2, f32(C + 1), ValueError, "b"),
    ("layernorm_backward", 3, f32(N + 1), ValueError, "mean"),
    ("rmsnorm_backward", 3, f32(N, 1), ValueError, "rstd"),
    ("rope_forward", 1, f32(N, HS), ValueError, "cos"),
    ("rope_backward", 2, f32(N + 1, HS // 2), ValueError, "sin"),
    ("attention_forward", 0, f32(B, T, NH * HS), ValueError, "q"),
    ("attention_forward", 1, f32(B, T, NKV, HS + 1), ValueError, "k"),
    ("attention_forward", 2, f32(B, T + 1, NKV, HS), ValueError, "v"),
    ("attention_backward", 1, f32(B, NH, T, T + 1), ValueError, "att"),
    ("attention_backward", 0, f32(B, T, NH, HS - 1), ValueError, "dout"),
    ("gelu_exact_backward", 1, f32(N, C + 1), ValueError, "inp"),
    ("swiglu_forward", 1, f32(C, N), ValueError, "up"),
    ("crossentropy_forward", 2, f32(N + 1), ValueError, "weights"),
    ("crossentropy_backward", 1, np.zeros(N - 1, np.int32), ValueError, "targets"),
    ("kl_backward", 1, f32(N, V + 1), ValueError, "ref_logits"),
    ("adamw_update", 2, np.zeros((N, C + 1), np.float32), ValueError, "m"),
    ("axpby", 1, f32(N * C), ValueError, "x"),
]

NOT_CONTIGUOUS = [
    ("linear_forward", 0, f32(N, 2 * C)[:, ::2], ValueError, "inp.*C-contiguous"),
    ("layernorm_forward", 0, f32(C, N).T, ValueError, "inp.*C-contiguous"),
    ("attention_forward", 0, f32(B, NH, T, HS).transpose(0, 2, 1, 3), ValueError, "q"),
    ("crossentropy_forward", 1, np.arange(2 * N, dtype=np.int32)[::2], ValueError, "targets"),
    ("relu_backward", 0, f32(N, 2 * C)[:, ::2], ValueError, "dout"),
    ("adamw_update", 3, np.zeros((N, 2 * C), np.float32)[:, ::2], ValueError, "v"),
]

READ_ONLY_OUTPUT = [
    ("adamw_update", 0, read_only(f32(N, C)), ValueError, "param is read-only"),
    ("adamw_update", 2, read_only(np.zeros((N, C), np.float32)), ValueError, "m is read-only"),
    ("adamw_update", 3, read_only(np.zeros((N, C), np.float32)), ValueError, "v is read-only"),
    ("scale_inplace", 0, read_only(f32(N, C)), ValueError, "x is read-only"),
    ("axpby", 0, read_only(f32(N, C)), ValueError, "out is read-only"),
]

INDEX_OUT_OF_RANGE = [
    ("embedding_forward", 0, np.array([0, V], dtype=np.int32), ValueError, r"tokens\[1\] = 10"),
    ("embedding_forward", 0, np.array([-1, 0], dtype=np.int32), ValueError, r"tokens\[0\] = -1"),
    ("embedding_backward", 1, np.array([0, 1, V + 5, 2], np.int32), ValueError, "tokens"),
    ("crossentropy_forward", 1, np.array([0, 1, V, 2], np.int32), ValueError, r"targets\[2\]"),
    ("crossentropy_backward", 1, np.array([-100, 1, 2, 3], np.int32), ValueError, "targets"),
]

ZERO_SIZE = [
    ("attention_forward", 0, f32(0, T, NH, HS), ValueError, "q must have B >= 1"),
    ("attention_forward", 0, f32(B, 0, NH, HS), ValueError, "q must have Tq >= 1"),
    ("attention_forward", 1, f32(B, 0, NKV, HS), ValueError, "k must have Tk >= 1"),
    ("attention_backward", 2, f32(B, 0, NH, HS), ValueError, "q must have T >= 1"),
    ("linear_forward", 0, f32(0, C), ValueError, "inp must have N >= 1"),
    ("layernorm_forward", 0, f32(N, 0), ValueError, "inp must have C >= 1"),
    ("embedding_forward", 0, np.zeros(0, np.int32), ValueError, "tokens must have N >= 1"),
    ("rope_forward", 0, f32(0, NH, HS), ValueError, "x must have N >= 1"),
    ("crossentropy_forward", 0, f32(N, 0), ValueError, "logits must have V >= 1"),
    ("kl_forward", 0, f32(0, V), ValueError, "logits must have N >= 1"),
    ("silu_forward", 0, f32(0, C), ValueError, "inp must have at least one element"),
    ("sum_squares", 0, f32(0), ValueError, "x must have at least one element"),
    ("embedding_backward", 2, 0, ValueError, "vocab_size"),
]

BAD_SCALAR = [
    ("layernorm_forward", 3, float("nan"), ValueError, "eps must be a finite number"),
    ("layernorm_forward", 3, 0.0, ValueError, "eps must be positive"),
    ("rmsnorm_forward", 2, -1e-6, ValueError, "eps must be positive"),
    ("rmsnorm_forward", 2, float("inf"), ValueError, "eps"),
    ("crossentropy_backward", 3, float("nan"), ValueError, "scale"),
    ("crossentropy_backward", 3, 1e39, ValueError, "scale.*float32 range"),
    ("kl_backward", 3, float("-inf"), ValueError, "scale"),
    ("adamw_update", 4, float("nan"), ValueError, "lr"),
    ("adamw_update", 4, -1e-3, ValueError, "lr must be at least 0"),
    ("adamw_update", 5, 1.0, ValueError, "beta1"),
    ("adamw_update", 6, -0.1, ValueError, "beta2"),
    ("adamw_update", 7, 0.0, ValueError, "eps"),
    ("adamw_update", 8, float("inf"), ValueError, "weight_decay"),
    ("adamw_update", 9, 0, ValueError, "step must be at least 1"),
    ("scale_inplace", 1, float("nan"), ValueError, "s must be a finite number"),
    ("axpby", 3, float("inf"), ValueError, "a must be a finite number"),
    ("axpby", 4, float("nan"), ValueError, "b must be a finite number"),
    ("layernorm_forward", 3, "1e-5", TypeError, "eps must be a real number, got str"),
    ("axpby", 3, None, TypeError, "a must be a real number, got NoneType"),
    ("adamw_update", 9, 1.5, TypeError, "step must be an integer, got float"),
    ("adamw_update", 9, 2**40, ValueError, "step is outside the range of a C int"),
    ("embedding_backward", 2, "10", TypeError, "vocab_size must be an integer"),
]

ALL_CASES = {
    "dtype": WRONG_DTYPE,
    "shape": WRONG_SHAPE,
    "contiguous": NOT_CONTIGUOUS,
    "read_only": READ_ONLY_OUTPUT,
    "index": INDEX_OUT_OF_RANGE,
    "zero_size": ZERO_SIZE,
    "scalar": BAD_SCALAR,
}


def case_params():
    for kind, cases in ALL_CASES.items():
        for i, (op, position, value, exception, pattern) in enumerate(cases):
            yield pytest.param(op, position, value, exception, pattern, id=f"{kind}-{op}-{i}")


@pytest.mark.parametrize("op, position, value, exception, pattern", list(case_params()))
def test_bad_argument_raises(op, position, value, exception, pattern):
    with pytest.raises(exception, match=pattern):
        call_with(op, position, value)


def test_attention_rejects_bad_head_counts():
    q, k, v = f32(B, T, 3, HS), f32(B, T, 2, HS), f32(B, T, 2, HS)
    with pytest.raises(ValueError, match="NH = 3.*not a multiple of the NKV = 2"):
        _core.attention_forward(q, k, v)
    att = np.zeros((B, 3, T, T), np.float32)
    with pytest.raises(ValueError, match="NH = 3"):
        _core.attention_backward(f32(B, T, 3, HS), att, q, k, v)


def test_attention_rejects_bad_options():
    with pytest.raises(ValueError, match="q_offset must be at least 0"):
        call_with("attention_forward", None, None, q_offset=-1)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        call_with("attention_forward", None, None, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        call_with("attention_forward", None, None, scale="large")
    with pytest.raises(TypeError, match="q_offset must be an integer"):
        call_with("attention_forward", None, None, q_offset=1.0)
    with pytest.raises(TypeError, match="key_mask"):
        call_with("attention_forward", None, None, key_mask=np.ones((B, T), bool))
    with pytest.raises(ValueError, match="key_mask"):
        call_with("attention_forward", None, None, key_mask=np.ones((B, T + 1), np.int32))


def test_rope_rejects_odd_head_size():
    x = f32(N, NH, 7)
    with pytest.raises(ValueError, match="odd head size HS = 7"):
        _core.rope_forward(x, f32(N, 3), f32(N, 3))


def test_loss_rejects_non_finite_weights():
    weights = np.array([1, np.nan, 1, 1], np.float32)
    with pytest.raises(ValueError, match="weights contains a non-finite value"):
        call_with("crossentropy_forward", 2, weights)
    with pytest.raises(ValueError, match="weights"):
        call_with("kl_backward", 2, weights)


def test_targets_of_zero_weight_rows_are_not_checked():
    targets = np.array([1, -100, 2, V + 7], np.int32)
    weights = np.array([1, 0, 1, 0], np.float32)
    loss_sum, losses = _core.crossentropy_forward(f32(N, V), targets, weights)
    assert np.isfinite(loss_sum)
    assert losses[1] == 0 and losses[3] == 0


def test_gradient_arrays_are_checked():
    dout, inp, w = f32(N, 5), f32(N, C), f32(5, C)
    with pytest.raises(ValueError, match="dinp is read-only"):
        _core.linear_backward(dout, inp, w, True, dinp=read_only(np.zeros((N, C), np.float32)))
    with pytest.raises(ValueError, match="dw must have shape"):
        _core.linear_backward(dout, inp, w, True, dw=np.zeros((C, 5), np.float32))
    with pytest.raises(ValueError, match="dinp shares memory with inp"):
        _core.linear_backward(dout, inp, w, True, dinp=inp)
    with pytest.raises(ValueError, match="dbias was passed but need_bias_grad is false"):
        _core.linear_backward(dout, inp, w, False, dbias=np.zeros(5, np.float32))
    shared = np.zeros(2 * N * C, np.float32)
    with pytest.raises(ValueError, match="dinp and dw share memory"):
        _core.rmsnorm_backward(f32(N, C), inp, f32(C), f32(N),
                               dinp=shared[: N * C].reshape(N, C), dw=shared[:C])
    q, k = f32(B, T, NH, HS), f32(B, T, NKV, HS)
    _, att = _core.attention_forward(q, k, k)
    with pytest.raises(ValueError, match="dk shares memory with k"):
        _core.attention_backward(q, att, q, k, k.copy(), dk=k)


def test_in_place_outputs_are_checked():
    params = f32(N, C)
    with pytest.raises(ValueError, match="param and m share memory"):
        _core.adamw_update(params, f32(N, C), params, np.zeros((N, C), np.float32),
                           1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    buffer = f32(N * C + 1)
    with pytest.raises(ValueError, match="out partly overlaps x"):
        _core.axpby(buffer[1:], buffer[:-1], f32(N * C), 1.0, 1.0)
    base = f32(N * V + 1)
    logits, shifted = base[:-1].reshape(N, V), base[1:].reshape(N, V)
    targets = np.ones(N, np.int32)
    with pytest.raises(ValueError, match="out partly overlaps logits"):
        _core.crossentropy_backward(logits, targets, np.ones(N, np.float32), 1.0, out=shifted)
    with pytest.raises(ValueError, match="out is read-only"):
        _core.kl_backward(logits, logits.copy(), np.ones(N, np.float32), 1.0,
                          out=read_only(logits))


JUNK = [None, 0, -1, 2**40, 1.5, float("nan"), "text", b"bytes", [], [1, 2], object(),
        np.float32(1.0), np.array(1.0, np.float32), np.zeros((0,), np.float32),
        np.zeros((1, 1, 1, 1, 1), np.float32), np.zeros(3, np.complex64),
        np.zeros((2, 3), np.float32).T]


@pytest.mark.parametrize("op", sorted(valid_args()))
def test_junk_arguments_raise_cleanly(op):
    """Every argument position, replaced by junk, gives an exception, never a crash."""
    size = len(valid_args()[op])
    for position in range(size):
        for junk in JUNK:
            try:
                call_with(op, position, junk)
            except (TypeError, ValueError, OverflowError):
                pass
    with pytest.raises(TypeError):
        getattr(_core, op)()
    with pytest.raises(TypeError):
        getattr(_core, op)(*valid_args()[op], no_such_argument=1)
