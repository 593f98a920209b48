"""Logits on selected rows only (head_rows) give the same losses and gradients as logits on every row."""
import numpy as np
import pytest

from skupy.config import ModelConfig
from skupy.model import Model, init_params, weighted_rows

B, T, V = 3, 7, 61


def build(tied, lora, E=None):
    config = ModelConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=24, max_position_embeddings=16, tie_word_embeddings=tied,
                         lora_rank=4 if lora else 0)
    params = init_params(config, seed=3)
    if lora:
        rng = np.random.default_rng(5)
        for name in params:
            if "lora_B" in name:
                params[name] = rng.normal(0, 0.1, params[name].shape).astype(np.float32)
    return Model(config, params, trainable="lora" if lora else "all")


def batch():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 5:] = 0
    weights = np.zeros((B, T), np.float32)
    weights[0, 2:6] = 0.25
    weights[1, 1:4] = 1 / 3
    weights[2, 6] = 1.0
    return tokens, targets, mask, weights


def gradients(model):
    return {name: grad.copy() for name, grad in model.grads.items()}


@pytest.mark.parametrize("tied,lora", [(True, False), (False, False), (True, True)])
def test_head_rows_ce_gradients_match(tied, lora):
    model = build(tied, lora)
    tokens, targets, mask, weights = batch()
    rows = weighted_rows(weights, tokens)
    assert rows is not None and rows.size == 8

    model.zero_grad()
    model.run(tokens, mask)
    full_total, full_losses = model.engine.cross_entropy(targets, weights, 1.0)
    model.engine.backward(model.param_list(), model._grad_list())
    full_grads = gradients(model)

    model.zero_grad()
    head_total = model.accumulate_ce(tokens, targets, weights, mask)
    head_grads = gradients(model)

    assert head_total == pytest.approx(full_total, rel=1e-6)
    for name in full_grads:
        np.testing.assert_allclose(head_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)
    _, head_losses = model.token_nll(tokens, targets, weights, mask)
    np.testing.assert_allclose(head_losses[weights != 0], full_losses[weights != 0], rtol=1e-6)
    assert np.all(head_losses[weights == 0] == 0)


def test_head_rows_logits_selected():
    model = build(False, False)
    tokens, _, mask, weights = batch()
    full = model.forward(tokens, mask)
    rows = weighted_rows(weights, tokens)
    model.run(tokens, mask, head_rows=rows)
    selected = model.engine.logits()
    assert selected.shape == (rows.size, V)
    np.testing.assert_allclose(selected, full.reshape(B * T, V)[rows], rtol=1e-5, atol=1e-6)


def test_head_rows_kl_matches():
    model = build(True, True)
    tokens, _, mask, weights = batch()
    rows = weighted_rows(weights, tokens)
    reference = model.forward(tokens, mask, use_lora=False)

    model.zero_grad()
    full_total = model.accumulate_kl(tokens, reference, weights, mask, scale=-1.0)
    full_grads = gradients(model)

    model.zero_grad()
    model.run(tokens, mask, head_rows=rows)
    head_total, _ = model.engine.kl_div(reference.reshape(B * T, V)[rows], weights, False, -1.0)
    model.engine.backward(model.param_list(), model._grad_list())
    assert head_total == pytest.approx(full_total, rel=1e-5)
    for name, grad in gradients(model).items():
        np.testing.assert_allclose(grad, full_grads[name], rtol=1e-4, atol=1e-8, err_msg=name)


def test_weight_outside_rows_rejected():
    model = build(True, False)
    tokens, targets, mask, weights = batch()
    model.run(tokens, mask, head_rows=np.array([2, 3], np.int32))
    with pytest.raises(ValueError, match=r"weights\[0, 4\] is 0.25, but forward\(\) computed logits only"):
        model.engine.cross_entropy(targets, weights)


def test_kl_reference_shape():
    model = build(True, False)
    tokens, _, mask, weights = batch()
    reference = model.forward(tokens, mask)
    model.run(tokens, mask, head_rows=weighted_rows(weights, tokens))
    with pytest.raises(ValueError, match=r"ref_logits must have 2 dimensions with shape \(8, 61\), got shape \(3, 7, 61\)"):
        model.engine.kl_div(reference, weights)


@pytest.mark.parametrize("rows,message", [
    (np.array([3, 3], np.int32), r"head_rows\[1\] = 3; head_rows must be strictly increasing"),
    (np.array([5, 2], np.int32), r"head_rows\[1\] = 2"),
    (np.array([0, B * T], np.int32), rf"head_rows\[1\] = {B * T}"),
    (np.array([-1], np.int32), r"head_rows\[0\] = -1"),
    (np.zeros(0, np.int32), "head_rows has 0 entries"),
    (np.arange(B * T + 1, dtype=np.int32), f"head_rows has {B * T + 1} entries"),
])
def test_bad_head_rows(rows, message):
    model = build(True, False)
    tokens, _, mask, _ = batch()
    with pytest.raises(ValueError, match=message):
        model.run(tokens, mask, head_rows=rows)


def test_head_rows_integer_dtype():
    model = build(True, False)
    tokens, _, mask, _ = batch()
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    with pytest.raises(TypeError, match="head_rows"):
        model.engine.forward(model.param_list(), tokens, positions, mask, True, np.array([0.0, 1.0]))


def test_weighted_rows_full_or_empty():
    tokens = np.zeros((2, 3), np.int32)
    assert weighted_rows(np.ones((2, 3), np.float32), tokens) is None
    assert weighted_rows(np.zeros((2, 3), np.float32), tokens) is None
    assert weighted_rows(np.ones((2, 4), np.float32), tokens) is None
    np.testing.assert_array_equal(weighted_rows(np.array([[0, 1, 0], [2, 0, 0]], np.float32), tokens), [1, 3])


@pytest.mark.parametrize("rows,error", [
    (np.array([1.7, 2.2]), TypeError),
    (np.zeros(B * T, bool), TypeError),
    (np.array([1, 2 ** 32 + 2]), ValueError),
])
def test_run_rejects_converted_rows(rows, error):
    model = build(True, False)
    tokens, _, mask, _ = batch()
    with pytest.raises(error, match="head_rows"):
        model.run(tokens, mask, head_rows=rows)
