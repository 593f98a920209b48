"""Numerical checks of the tensor ops in skupy._core against float64 references.

Every forward is compared with a small float64 NumPy reference written here.
Every backward (float32, in C) is compared with central finite differences of
that reference, taken in float64 on the projection L = sum(R * output) with a
random R. Inputs are drawn in float32 and widened, so C and reference see the
same numbers.

Tolerances:
  forward:  assert_allclose(rtol=1e-5, atol=1e-6), about 100 float32 roundings.
  backward: max |g_c - g_fd| <= 1e-5 * max |g_fd|, step h = 1e-5. The float64
            differences are exact to about 1e-10, so the margin covers float32
            rounding in C, and a wrong formula misses it by orders of magnitude.
"""
import math

import numpy as np
import pytest

from skupy import _core

FORWARD_RTOL = 1e-5
FORWARD_ATOL = 1e-6
GRAD_TOL = 1e-5
FD_STEP = 1e-5


# ---------------------------------------------------------------------------
# Helpers


def random_f32(rng, *shape, scale=1.0):
    """Return a float32 array and its exact float64 copy."""
    x32 = (scale * rng.standard_normal(shape)).astype(np.float32)
    return x32, x32.astype(np.float64)


def numerical_gradient(loss, x, h=FD_STEP):
    """Differentiate loss() with respect to the float64 array x, which loss reads.

    x is perturbed in place one element at a time and restored afterwards.
    """
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    grad_flat = grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + h
        plus = loss()
        flat[i] = original - h
        minus = loss()
        flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * h)
    return grad


def assert_gradient_close(actual, expected, name):
    scale = np.abs(expected).max()
    assert scale > 0, f"{name}: the finite-difference gradient is all zeros, so the check is void"
    error = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert error <= GRAD_TOL, f"{name}: max error {error:.2e} relative to max |grad| {scale:.2e}"


def assert_forward_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=FORWARD_RTOL, atol=FORWARD_ATOL)


def logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def log_softmax(x):
    return x - logsumexp(x)[..., None]


# ---------------------------------------------------------------------------
# float64 references


def embedding_reference(tokens, wte):
    return wte[tokens]


def linear_reference(inp, w, bias):
    out = inp @ w.T
    return out if bias is None else out + bias


def layernorm_reference(inp, w, b, eps):
    mean = inp.mean(axis=1, keepdims=True)
    var = ((inp - mean) ** 2).mean(axis=1, keepdims=True)
    out = (inp - mean) / np.sqrt(var + eps) * w
    return out if b is None else out + b


def rmsnorm_reference(inp, w, eps):
    return inp / np.sqrt((inp**2).mean(axis=1, keepdims=True) + eps) * w


def rope_angles(N, HS, base=10000.0):
    """Return cos, sin (N, HS/2) for positions 0..N-1, as float32 and float64."""
    inv_freq = base ** (-np.arange(0, HS, 2) / HS)
    angles = np.arange(N)[:, None] * inv_freq[None, :]
    cos32, sin32 = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return cos32, sin32, cos32.astype(np.float64), sin32.astype(np.float64)


def rope_reference(x, cos, sin, interleaved):
    """Rotate x (N, NH, HS) the way HF LLaMA (rotate_half) or GPT-J does."""
    if interleaved:
        cos_full = np.repeat(cos, 2, axis=1)[:, None, :]
        sin_full = np.repeat(sin, 2, axis=1)[:, None, :]
        rotated = np.empty_like(x)
        rotated[..., 0::2] = -x[..., 1::2]
        rotated[..., 1::2] = x[..., 0::2]
    else:
        cos_full = np.concatenate([cos, cos], axis=1)[:, None, :]
        sin_full = np.concatenate([sin, sin], axis=1)[:, None, :]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos_full + rotated * sin_full


def attention_reference(q, k, v, key_mask=None, q_offset=0, scale=None):
    B, Tq, NH, HS = q.shape
    Tk, NKV = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    group = NH // NKV
    out = np.zeros((B, Tq, NH, HS))
    att = np.zeros((B, NH, Tq, Tk))
    causal = np.arange(Tk)[None, :] <= (q_offset + np.arange(Tq))[:, None]
    for b in range(B):
        allowed = causal if key_mask is None else causal & (key_mask[b] != 0)[None, :]
        for h in range(NH):
            kv = h // group
            scores = scale * q[b, :, h, :] @ k[b, :, kv, :].T
            for i in range(Tq):
                if not allowed[i].any():
                    continue
                row = np.where(allowed[i], scores[i], -np.inf)
                p = np.exp(row - row.max())
                att[b, h, i] = p / p.sum()
            out[b, :, h, :] = att[b, h] @ v[b, :, kv, :]
    return out, att


def gelu_tanh_reference(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_exact_reference(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def relu_reference(x):
    return np.maximum(x, 0)


def silu_reference(x):
    return x / (1 + np.exp(-x))


def crossentropy_reference(logits, targets, weights):
    active = weights != 0
    safe_targets = np.where(active, targets, 0)
    picked = np.take_along_axis(logits, safe_targets[:, None], axis=1)[:, 0]
    losses = np.where(active, logsumexp(logits) - picked, 0.0)
    return (weights * losses).sum(), losses


def kl_reference(logits, ref_logits, weights, reverse):
    log_p = log_softmax(logits)
    log_p_ref = log_softmax(ref_logits)
    if reverse:
        losses = (np.exp(log_p) * (log_p - log_p_ref)).sum(axis=1)
    else:
        losses = (np.exp(log_p_ref) * (log_p_ref - log_p)).sum(axis=1)
    losses = np.where(weights != 0, losses, 0.0)
    return (weights * losses).sum(), losses


# ---------------------------------------------------------------------------
# Embedding and linear


def test_embedding_forward_backward():
    rng = np.random.default_rng(0)
    V, C = 6, 5
    tokens = np.array([1, 4, 1, 0, 5, 1], dtype=np.int32)  # token 1 repeats
    wte32, wte = random_f32(rng, V, C)
    R = rng.standard_normal((tokens.size, C))

    out = _core.embedding_forward(tokens, wte32)
    assert_forward_close(out, embedding_reference(tokens, wte))

    dwte = _core.embedding_backward(R.astype(np.float32), tokens, V)
    expected = numerical_gradient(lambda: (R * embedding_reference(tokens, wte)).sum(), wte)
    assert_gradient_close(dwte, expected, "dwte")
    assert np.all(dwte[[2, 3]] == 0), "rows of unused tokens must get no gradient"


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_backward(with_bias):
    rng = np.random.default_rng(1)
    N, IC, OC = 3, 4, 5
    inp32, inp = random_f32(rng, N, IC)
    w32, w = random_f32(rng, OC, IC)
    b32, b = random_f32(rng, OC) if with_bias else (None, None)
    R = rng.standard_normal((N, OC))

    out = _core.linear_forward(inp32, w32, b32)
    assert_forward_close(out, linear_reference(inp, w, b))

    dinp, dw, dbias = _core.linear_backward(R.astype(np.float32), inp32, w32, with_bias)

    def loss():
        return (R * linear_reference(inp, w, b)).sum()

    assert_gradient_close(dinp, numerical_gradient(loss, inp), "dinp")
    assert_gradient_close(dw, numerical_gradient(loss, w), "dw")
    if with_bias:
        assert_gradient_close(dbias, numerical_gradient(loss, b), "dbias")
    else:
        assert dbias is None


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 7, 8, 16, 17])
def test_linear_forward_row_counts(N):
    # Up to 16 rows take the few-rows kernel instead of sgemm; 17 takes sgemm.
    rng = np.random.default_rng(N)
    IC, OC = 37, 9
    inp32, inp = random_f32(rng, N, IC)
    w32, w = random_f32(rng, OC, IC)
    b32, b = random_f32(rng, OC)
    out = _core.linear_forward(inp32, w32, b32)
    assert_forward_close(out, linear_reference(inp, w, b))


def test_linear_backward_accumulates():
    rng = np.random.default_rng(2)
    inp, w, dout = (rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5, 4), (3, 5)])
    fresh = _core.linear_backward(dout, inp, w, True)
    accumulators = [np.ones((3, 4), np.float32), np.ones((5, 4), np.float32),
                    np.ones(5, np.float32)]
    returned = _core.linear_backward(dout, inp, w, True, *accumulators)
    for name, g, r, f in zip(["dinp", "dw", "dbias"], accumulators, returned, fresh):
        assert r is g, f"{name} must be accumulated into the array passed in"
        np.testing.assert_allclose(g, 1 + f, rtol=1e-6, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm_forward_backward(with_bias):
    rng = np.random.default_rng(3)
    N, C, eps = 4, 6, 1e-5
    inp32, inp = random_f32(rng, N, C, scale=2.0)
    inp32 += 3.0  # an offset mean exercises the mean subtraction
    inp += 3.0
    w32, w = random_f32(rng, C)
    b32, b = random_f32(rng, C) if with_bias else (None, None)
    R = rng.standard_normal((N, C))

    out, mean, rstd = _core.layernorm_forward(inp32, w32, b32, eps)
    assert_forward_close(out, layernorm_reference(inp, w, b, eps))
    assert_forward_close(mean, inp.mean(axis=1))
    assert_forward_close(rstd, 1 / np.sqrt(inp.var(axis=1) + eps))

    dinp, dw, db = _core.layernorm_backward(R.astype(np.float32), inp32, w32, mean, rstd,
                                            with_bias)

    def loss():
        return (R * layernorm_reference(inp, w, b, eps)).sum()

    assert_gradient_close(dinp, numerical_gradient(loss, inp), "dinp")
    assert_gradient_close(dw, numerical_gradient(loss, w), "dw")
    if with_bias:
        assert_gradient_close(db, numerical_gradient(loss, b), "db")
    else:
        assert db is None


def test_rmsnorm_forward_backward():
    rng = np.random.default_rng(4)
    N, C, eps = 4, 6, 1e-6
    inp32, inp = random_f32(rng, N, C)
    w32, w = random_f32(rng, C)
    R = rng.standard_normal((N, C))

    out, rstd = _core.rmsnorm_forward(inp32, w32, eps)
    assert_forward_close(out, rmsnorm_reference(inp, w, eps))
    assert_forward_close(rstd, 1 / np.sqrt((inp**2).mean(axis=1) + eps))

    dinp, dw = _core.rmsnorm_backward(R.astype(np.float32), inp32, w32, rstd)

    def loss():
        return (R * rmsnorm_reference(inp, w, eps)).sum()

    assert_gradient_close(dinp, numerical_gradient(loss, inp), "dinp")
    assert_gradient_close(dw, numerical_gradient(loss, w), "dw")


def test_norm_backward_accumulates():
    rng = np.random.default_rng(5)
    inp = rng.standard_normal((3, 8)).astype(np.float32)
    w, b = rng.standard_normal((2, 8)).astype(np.float32)
    dout = rng.standard_normal((3, 8)).astype(np.float32)
    _, mean, rstd = _core.layernorm_forward(inp, w, b, 1e-5)
    fresh = _core.layernorm_backward(dout, inp, w, mean, rstd)
    accumulators = [np.ones((3, 8), np.float32), np.ones(8, np.float32), np.ones(8, np.float32)]
    _core.layernorm_backward(dout, inp, w, mean, rstd, True, *accumulators)
    for name, g, f in zip(["dinp", "dw", "db"], accumulators, fresh):
        np.testing.assert_allclose(g, 1 + f, rtol=1e-6, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------
# Rotary position embedding


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_forward_backward(interleaved):
    rng = np.random.default_rng(6)
    N, NH, HS = 5, 2, 8
    x32, x = random_f32(rng, N, NH, HS)
    cos32, sin32, cos, sin = rope_angles(N, HS)
    R = rng.standard_normal((N, NH, HS))

    out = _core.rope_forward(x32, cos32, sin32, interleaved)
    assert_forward_close(out, rope_reference(x, cos, sin, interleaved))
    assert not np.array_equal(out, x32), "the input must not be rotated in place"

    dx = _core.rope_backward(R.astype(np.float32), cos32, sin32, interleaved)
    expected = numerical_gradient(lambda: (R * rope_reference(x, cos, sin, interleaved)).sum(), x)
    assert_gradient_close(dx, expected, "dx")


def test_rope_layouts_differ():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 1, 8)).astype(np.float32)
    cos, sin, _, _ = rope_angles(4, 8)
    half = _core.rope_forward(x, cos, sin, False)
    pairs = _core.rope_forward(x, cos, sin, True)
    assert not np.allclose(half[1:], pairs[1:]), "the two layouts must pair different elements"


# ---------------------------------------------------------------------------
# Attention


ATTENTION_CASES = {
    # name: (B, T, NH, NKV, HS, key_mask)
    "multi_head": (2, 5, 2, 2, 4, None),
    "gqa_two_kv_heads": (2, 5, 4, 2, 4, None),
    "gqa_one_kv_head": (1, 6, 4, 1, 4, None),
    # Row 0 is left-padded, so its first queries see no valid key at all. Row 1
    # has a hole in the middle and right padding.
    "key_padding": (2, 6, 4, 2, 4, [[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0]]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_forward_backward(case):
    B, T, NH, NKV, HS, mask_rows = ATTENTION_CASES[case]
    rng = np.random.default_rng(8)
    q32, q = random_f32(rng, B, T, NH, HS)
    k32, k = random_f32(rng, B, T, NKV, HS)
    v32, v = random_f32(rng, B, T, NKV, HS)
    key_mask = None if mask_rows is None else np.array(mask_rows, dtype=np.int32)
    R = rng.standard_normal((B, T, NH, HS))

    out, att = _core.attention_forward(q32, k32, v32, key_mask)
    out_ref, att_ref = attention_reference(q, k, v, key_mask)
    assert_forward_close(out, out_ref)
    assert_forward_close(att, att_ref)

    dq, dk, dv = _core.attention_backward(R.astype(np.float32), att, q32, k32, v32)

    def loss():
        return (R * attention_reference(q, k, v, key_mask)[0]).sum()

    assert_gradient_close(dq, numerical_gradient(loss, q), "dq")
    assert_gradient_close(dk, numerical_gradient(loss, k), "dk")
    assert_gradient_close(dv, numerical_gradient(loss, v), "dv")

    if key_mask is not None:
        masked = key_mask == 0
        assert np.all(dk[masked] == 0), "masked keys must get no gradient"
        assert np.all(dv[masked] == 0), "masked values must get no gradient"
        # Queries 0 and 1 of batch row 0 see only padded keys.
        assert np.all(out[0, :2] == 0)
        assert np.all(att[0, :, :2] == 0)
        assert np.all(dq[0, :2] == 0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_decoding_offset(with_mask):
    """Tq new queries at positions q_offset.. against Tk cached keys."""
    rng = np.random.default_rng(9)
    B, Tk, Tq, NH, NKV, HS = 2, 7, 3, 4, 2, 4
    q_offset = Tk - Tq
    q32, q = random_f32(rng, B, Tq, NH, HS)
    k32, k = random_f32(rng, B, Tk, NKV, HS)
    v32, v = random_f32(rng, B, Tk, NKV, HS)
    key_mask = np.array([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]], np.int32)
    key_mask = key_mask if with_mask else None

    out, att = _core.attention_forward(q32, k32, v32, key_mask, q_offset)
    out_ref, att_ref = attention_reference(q, k, v, key_mask, q_offset)
    assert_forward_close(out, out_ref)
    assert_forward_close(att, att_ref)

    # Prefilling all Tk positions and keeping the last Tq queries gives the same rows.
    q_full32 = rng.standard_normal((B, Tk, NH, HS)).astype(np.float32)
    q_full32[:, q_offset:] = q32
    out_full, _ = _core.attention_forward(q_full32, k32, v32, key_mask)
    np.testing.assert_allclose(out_full[:, q_offset:], out, rtol=1e-6, atol=1e-6)


def test_attention_offset_beyond_keys():
    """Queries whose position exceeds Tk - 1 see every cached key."""
    rng = np.random.default_rng(10)
    q32, q = random_f32(rng, 1, 2, 2, 4)
    k32, k = random_f32(rng, 1, 3, 2, 4)
    v32, v = random_f32(rng, 1, 3, 2, 4)
    out, att = _core.attention_forward(q32, k32, v32, None, 5, 0.3)
    out_ref, att_ref = attention_reference(q, k, v, None, 5, 0.3)
    assert_forward_close(out, out_ref)
    assert_forward_close(att, att_ref)


def test_attention_backward_accumulates():
    rng = np.random.default_rng(11)
    q, dout = rng.standard_normal((2, 1, 4, 4, 4)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, 4, 2, 4)).astype(np.float32)
    _, att = _core.attention_forward(q, k, v)
    fresh = _core.attention_backward(dout, att, q, k, v)
    accumulators = [np.ones_like(q), np.ones_like(k), np.ones_like(v)]
    _core.attention_backward(dout, att, q, k, v, None, *accumulators)
    for name, g, f in zip(["dq", "dk", "dv"], accumulators, fresh):
        np.testing.assert_allclose(g, 1 + f, rtol=1e-6, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------
# Pointwise activations


POINTWISE = {
    "gelu_tanh": gelu_tanh_reference,
    "gelu_exact": gelu_exact_reference,
    "relu": relu_reference,
    "silu": silu_reference,
}


@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_forward_backward(name):
    reference = POINTWISE[name]
    forward = getattr(_core, f"{name}_forward")
    backward = getattr(_core, f"{name}_backward")
    rng = np.random.default_rng(12)
    x32, x = random_f32(rng, 3, 7, scale=2.5)
    # Keep relu's kink at 0 out of reach of the finite-difference step.
    x32[np.abs(x32) < 1e-3] = 0.5
    x = x32.astype(np.float64)
    R = rng.standard_normal(x.shape)

    assert_forward_close(forward(x32), reference(x))
    dx = backward(R.astype(np.float32), x32)
    assert_gradient_close(dx, numerical_gradient(lambda: (R * reference(x)).sum(), x), "dinp")

    accumulators = np.ones_like(x32)
    backward(R.astype(np.float32), x32, accumulators)
    np.testing.assert_allclose(accumulators, 1 + dx, rtol=1e-6, atol=1e-6)


def test_gelu_tanh_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.linspace(-8, 8, 1001, dtype=np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    # atol covers x near -5, where both round the cancellation in 1 + tanh(u) differently.
    np.testing.assert_allclose(_core.gelu_tanh_forward(x), expected, rtol=1e-6, atol=5e-7)

    x_torch = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.gelu(x_torch, approximate="tanh").sum().backward()
    dinp = _core.gelu_tanh_backward(np.ones_like(x), x)
    # For x below about -5, torch's float32 tanh(u) rounds to -1 and its gradient
    # to exactly 0, while the true gradient is still near -1e-6.
    np.testing.assert_allclose(dinp, x_torch.grad.numpy(), rtol=1e-5, atol=2e-6)


def test_swiglu_forward_backward():
    rng = np.random.default_rng(13)
    gate32, gate = random_f32(rng, 4, 5, scale=2.0)
    up32, up = random_f32(rng, 4, 5)
    R = rng.standard_normal((4, 5))

    def reference():
        return silu_reference(gate) * up

    assert_forward_close(_core.swiglu_forward(gate32, up32), reference())
    dgate, dup = _core.swiglu_backward(R.astype(np.float32), gate32, up32)
    assert_gradient_close(dgate, numerical_gradient(lambda: (R * reference()).sum(), gate), "dgate")
    assert_gradient_close(dup, numerical_gradient(lambda: (R * reference()).sum(), up), "dup")


# ---------------------------------------------------------------------------
# Cross-entropy and KL divergence


def loss_inputs(rng, N=5, V=7):
    logits32, logits = random_f32(rng, N, V, scale=3.0)
    weights = np.array([1.0, 0.0, 2.5, -0.5, 0.0], dtype=np.float32)[:N]
    return logits32, logits, weights


def test_crossentropy_forward_backward():
    rng = np.random.default_rng(14)
    logits32, logits, weights = loss_inputs(rng)
    # Rows of weight 0 carry an ignore-index target that must never be read.
    targets = np.array([3, -100, 0, 6, 99], dtype=np.int32)
    scale = 0.7

    loss_sum, losses = _core.crossentropy_forward(logits32, targets, weights)
    ref_sum, ref_losses = crossentropy_reference(logits, targets, weights.astype(np.float64))
    assert_forward_close(losses, ref_losses)
    assert loss_sum == pytest.approx(ref_sum, rel=1e-6)
    assert np.all(losses[weights == 0] == 0)

    dlogits = _core.crossentropy_backward(logits32, targets, weights, scale)
    expected = numerical_gradient(
        lambda: scale * crossentropy_reference(logits, targets, weights.astype(np.float64))[0],
        logits)
    assert_gradient_close(dlogits, expected, "dlogits")
    assert np.all(dlogits[weights == 0] == 0), "rows of weight 0 must get zero gradient"


def test_crossentropy_backward_in_place():
    rng = np.random.default_rng(15)
    logits32, _, weights = loss_inputs(rng)
    targets = np.array([1, 2, 3, 4, 5], dtype=np.int32)
    expected = _core.crossentropy_backward(logits32, targets, weights, 1.5)
    returned = _core.crossentropy_backward(logits32, targets, weights, 1.5, out=logits32)
    assert returned is logits32
    np.testing.assert_array_equal(logits32, expected)


def test_crossentropy_large_vocab():
    """Over V = 50,000 with large logits, the double sums keep float32 accuracy."""
    rng = np.random.default_rng(16)
    N, V = 3, 50_000
    logits32, logits = random_f32(rng, N, V, scale=4.0)
    logits32[:, 17] += 30.0
    logits[:, 17] += 30.0
    targets = np.array([17, 5, 49_999], dtype=np.int32)
    weights = np.ones(N, dtype=np.float32)

    loss_sum, losses = _core.crossentropy_forward(logits32, targets, weights)
    ref_sum, ref_losses = crossentropy_reference(logits, targets, weights.astype(np.float64))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, atol=1e-6)
    assert loss_sum == pytest.approx(ref_sum, rel=2e-6)

    dlogits = _core.crossentropy_backward(logits32, targets, weights, 1.0)
    probs = np.exp(log_softmax(logits))
    probs[np.arange(N), targets] -= 1
    np.testing.assert_allclose(dlogits, probs, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reverse", [False, True])
def test_kl_forward_backward(reverse):
    rng = np.random.default_rng(17)
    logits32, logits, weights = loss_inputs(rng)
    ref32, ref = random_f32(rng, *logits.shape, scale=3.0)
    scale = 1.3

    loss_sum, losses = _core.kl_forward(logits32, ref32, weights, reverse)
    ref_sum, ref_losses = kl_reference(logits, ref, weights.astype(np.float64), reverse)
    assert_forward_close(losses, ref_losses)
    assert loss_sum == pytest.approx(ref_sum, rel=1e-6)

    dlogits = _core.kl_backward(logits32, ref32, weights, scale, reverse)
    expected = numerical_gradient(
        lambda: scale * kl_reference(logits, ref, weights.astype(np.float64), reverse)[0], logits)
    assert_gradient_close(dlogits, expected, "dlogits")
    assert np.all(dlogits[weights == 0] == 0)

    in_place = logits32.copy()
    _core.kl_backward(in_place, ref32, weights, scale, reverse, out=in_place)
    np.testing.assert_array_equal(in_place, dlogits)


@pytest.mark.parametrize("reverse", [False, True])
def test_kl_large_vocab(reverse):
    rng = np.random.default_rng(18)
    N, V = 2, 50_000
    logits32, logits = random_f32(rng, N, V, scale=3.0)
    ref32, ref = random_f32(rng, N, V, scale=3.0)
    weights = np.ones(N, dtype=np.float32)
    _, losses = _core.kl_forward(logits32, ref32, weights, reverse)
    _, ref_losses = kl_reference(logits, ref, weights.astype(np.float64), reverse)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_kl_of_identical_distributions_is_zero():
    rng = np.random.default_rng(19)
    logits = rng.standard_normal((3, 100)).astype(np.float32)
    shifted = logits + np.float32(5.0)  # the same softmax
    weights = np.ones(3, dtype=np.float32)
    for reverse in (False, True):
        _, losses = _core.kl_forward(logits, shifted, weights, reverse)
        assert np.all(np.abs(losses) < 1e-6)


def test_losses_accept_minus_inf_logits():
    """A logit of -inf (a banned token) has probability 0 and yields no NaN."""
    logits = np.array([[1.0, -np.inf, 2.0], [0.5, 0.0, -np.inf]], np.float32)
    ref_logits = np.array([[0.0, -np.inf, 1.0], [1.0, -1.0, -np.inf]], np.float32)
    targets = np.array([2, 0], np.int32)
    weights = np.ones(2, np.float32)
    finite = np.where(np.isinf(logits), -1e4, logits).astype(np.float64)
    finite_ref = np.where(np.isinf(ref_logits), -1e4, ref_logits).astype(np.float64)

    _, losses = _core.crossentropy_forward(logits, targets, weights)
    assert_forward_close(losses, crossentropy_reference(finite, targets, weights)[1])
    dlogits = _core.crossentropy_backward(logits, targets, weights, 1.0)
    assert np.all(np.isfinite(dlogits))
    assert np.all(dlogits[np.isinf(logits)] == 0)

    for reverse in (False, True):
        _, losses = _core.kl_forward(logits, ref_logits, weights, reverse)
        assert_forward_close(losses, kl_reference(finite, finite_ref, weights, reverse)[1])
        dlogits = _core.kl_backward(logits, ref_logits, weights, 1.0, reverse)
        assert np.all(np.isfinite(dlogits))


# ---------------------------------------------------------------------------
# Optimizer and vector arithmetic


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
def test_adamw_matches_torch(betas):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(20)
    shape = (37, 5)
    lr, eps, weight_decay = 3e-3, 1e-8, 0.1

    param = rng.standard_normal(shape).astype(np.float32)
    m = np.zeros(shape, np.float32)
    v = np.zeros(shape, np.float32)
    torch_param = torch.nn.Parameter(torch.from_numpy(param.copy()))
    optimizer = torch.optim.AdamW([torch_param], lr=lr, betas=betas, eps=eps,
                                  weight_decay=weight_decay, foreach=False)

    for step in range(1, 21):
        grad = rng.standard_normal(shape).astype(np.float32)
        torch_param.grad = torch.from_numpy(grad.copy())
        optimizer.step()
        _core.adamw_update(param, grad, m, v, lr, betas[0], betas[1], eps, weight_decay, step)

        state = optimizer.state[torch_param]
        np.testing.assert_allclose(m, state["exp_avg"].numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=f"m at step {step}")
        # ops.h passes beta2 as a float32, and float32(0.999) makes 1 - beta2 off
        # by 1.3e-5 relative. The bias correction divides most of it out of param.
        np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), rtol=2e-5, atol=1e-9,
                                   err_msg=f"v at step {step}")
        np.testing.assert_allclose(param, torch_param.detach().numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=f"param at step {step}")


def test_sum_squares():
    rng = np.random.default_rng(21)
    for size in (1, 63, 64, 65, 1_000_003):
        x = rng.standard_normal(size).astype(np.float32)
        expected = (x.astype(np.float64) ** 2).sum()
        assert _core.sum_squares(x) == pytest.approx(expected, rel=1e-12)
    matrix = rng.standard_normal((7, 9)).astype(np.float32)
    assert _core.sum_squares(matrix) == pytest.approx((matrix.astype(np.float64) ** 2).sum(),
                                                      rel=1e-12)


def test_axpby_and_scale_inplace():
    rng = np.random.default_rng(22)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.standard_normal((4, 6)).astype(np.float32)
    a, b = 0.75, -1.5
    expected = (a * x.astype(np.float64) + b * y.astype(np.float64)).astype(np.float32)

    out = np.empty_like(x)
    _core.axpby(out, x, y, a, b)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)

    # out may alias x or y.
    x_alias = x.copy()
    _core.axpby(x_alias, x_alias, y, a, b)
    np.testing.assert_array_equal(x_alias, out)
    y_alias = y.copy()
    _core.axpby(y_alias, x, y_alias, a, b)
    np.testing.assert_array_equal(y_alias, out)

    scaled = x.copy()
    _core.scale_inplace(scaled, -2.5)
    np.testing.assert_array_equal(scaled, x * np.float32(-2.5))


# ---------------------------------------------------------------------------
# Reproducibility


def run_every_op(rng_seed=23):
    """Run each op once on mid-sized inputs and return its outputs by name."""
    rng = np.random.default_rng(rng_seed)
    N, C, V, B, T, NH, NKV, HS = 96, 80, 1000, 2, 48, 4, 2, 16

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    inp, dout, w, b = f32(N, C), f32(N, C), f32(C), f32(C)
    tokens = rng.integers(0, 7, N).astype(np.int32)  # many repeats
    logits, ref = f32(N, V), f32(N, V)
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = rng.random(N).astype(np.float32)
    q, k, v, dq_out = f32(B, T, NH, HS), f32(B, T, NKV, HS), f32(B, T, NKV, HS), f32(B, T, NH, HS)
    key_mask = (rng.random((B, T)) > 0.2).astype(np.int32)
    cos, sin, _, _ = rope_angles(N, HS)

    outputs = {"dwte": _core.embedding_backward(dout, tokens, 7)}
    _, mean, rstd = _core.layernorm_forward(inp, w, b, 1e-5)
    outputs.update(zip(["ln_dinp", "ln_dw", "ln_db"],
                       _core.layernorm_backward(dout, inp, w, mean, rstd)))
    _, rms = _core.rmsnorm_forward(inp, w, 1e-6)
    outputs.update(zip(["rms_dinp", "rms_dw"], _core.rmsnorm_backward(dout, inp, w, rms)))
    outputs.update(zip(["linear_dinp", "linear_dw", "linear_dbias"],
                       _core.linear_backward(dout, inp, f32(C, C), True)))
    outputs["att_out"], outputs["att"] = _core.attention_forward(q, k, v, key_mask)
    outputs.update(zip(["dq", "dk", "dv"],
                       _core.attention_backward(dq_out, outputs["att"], q, k, v)))
    outputs["rope"] = _core.rope_forward(q.reshape(B * T, NH, HS)[:N], cos, sin)
    outputs["ce_losses"] = _core.crossentropy_forward(logits, targets, weights)[1]
    outputs["ce_dlogits"] = _core.crossentropy_backward(logits, targets, weights, 0.5)
    outputs["kl_losses"] = _core.kl_forward(logits, ref, weights, True)[1]
    outputs["kl_dlogits"] = _core.kl_backward(logits, ref, weights, 0.5, True)
    outputs["sum_squares"] = np.array([_core.sum_squares(logits)])
    return outputs


@pytest.fixture
def restore_threads():
    saved = _core.get_num_threads()
    yield
    _core.set_num_threads(saved)


def test_bitwise_reproducible_two_threads(restore_threads):
    _core.set_num_threads(2)
    first = run_every_op()
    second = run_every_op()
    for name in first:
        assert first[name].tobytes() == second[name].tobytes(), f"{name} differs between two runs"


def test_own_loops_ignore_thread_count(restore_threads):
    """ops.c's own loops (all but the sgemm calls) do not depend on the thread count."""
    _core.set_num_threads(1)
    single_thread = run_every_op()
    _core.set_num_threads(2)
    two_threads = run_every_op()
    blas_outputs = {"linear_dinp", "linear_dw"}
    for name in single_thread:
        if name not in blas_outputs:
            assert single_thread[name].tobytes() == two_threads[name].tobytes(), \
                f"{name} differs between 1 and 2 threads"
