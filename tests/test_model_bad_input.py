"""Bad input to the Model and its C engine raises a clear Python exception, never a crash."""
import numpy as np
import pytest

from skupy import _core
from skupy.config import ModelConfig
from skupy.model import Model, engine_config, init_params


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                         max_position_embeddings=8)
    return Model(config, init_params(config, seed=0))


def ids(shape, high=50):
    return np.random.default_rng(0).integers(0, high, shape).astype(np.int32)


def test_token_outside_vocabulary(model):
    tokens = ids((1, 4))
    tokens[0, 2] = 50
    with pytest.raises(ValueError, match=r"tokens\[2\] = 50 is out of range"):
        model.forward(tokens)


def test_negative_token(model):
    with pytest.raises(ValueError, match="tokens contains ids outside"):
        model.forward(np.array([[1, -3]]))


def test_sequence_longer_than_config(model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=8"):
        model.forward(ids((1, 9)))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_empty_batch_or_sequence(model, shape):
    with pytest.raises(ValueError, match="B and T must be at least 1"):
        model.forward(np.zeros(shape, np.int32))


def test_float_tokens(model):
    with pytest.raises(TypeError, match="tokens must contain integers"):
        model.forward(np.ones((1, 3), np.float32))


def test_mask_shape_mismatch(model):
    with pytest.raises(ValueError, match="mask has shape"):
        model.forward(ids((1, 4)), mask=np.ones((1, 5)))


def test_engine_wrong_param_count(model):
    tokens = ids((1, 3))
    with pytest.raises(ValueError, match="params must have"):
        model.engine.forward(model.param_list()[:-1], tokens, tokens * 0, tokens * 0 + 1)


def test_engine_param_wrong_dtype(model):
    params = model.param_list()
    params[0] = params[0].astype(np.float64)
    tokens = ids((1, 3))
    with pytest.raises(TypeError, match=r"params\[embed_tokens.weight\] must have dtype float32"):
        model.engine.forward(params, tokens, np.zeros_like(tokens), np.ones_like(tokens))


def test_engine_param_wrong_shape(model):
    params = model.param_list()
    params[0] = np.zeros((49, 16), np.float32)
    tokens = ids((1, 3))
    with pytest.raises(ValueError, match=r"params\[embed_tokens.weight\] must have shape \(50, 16\)"):
        model.engine.forward(params, tokens, np.zeros_like(tokens), np.ones_like(tokens))


def test_engine_non_contiguous_param(model):
    params = model.param_list()
    params[0] = np.asfortranarray(params[0])
    tokens = ids((1, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        model.engine.forward(params, tokens, np.zeros_like(tokens), np.ones_like(tokens))


def test_engine_positions_out_of_range(model):
    tokens = ids((1, 3))
    with pytest.raises(ValueError, match="positions"):
        model.engine.forward(model.param_list(), tokens, np.full_like(tokens, 8), np.ones_like(tokens))


def test_read_only_gradient_rejected(model):
    tokens = ids((1, 3))
    model.run(tokens)
    model.engine.cross_entropy(tokens, np.full(tokens.shape, 0.1, np.float32), 1.0)
    grads = [np.zeros(a.shape, np.float32) for a in model.param_list()]
    grads[0].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        model.engine.backward(model.param_list(), grads)


def test_backward_without_loss(model):
    model.run(ids((1, 3)))
    with pytest.raises(RuntimeError, match="no loss gradient"):
        model.engine.backward(model.param_list(), [None] * len(model.specs))


def test_logits_after_gradient_overwrite(model):
    tokens = ids((1, 3))
    model.run(tokens)
    model.engine.cross_entropy(tokens, np.full(tokens.shape, 0.1, np.float32), 1.0)
    with pytest.raises(RuntimeError, match="overwritten"):
        model.engine.logits()


def test_targets_out_of_range_only_where_weighted(model):
    tokens = ids((1, 3))
    model.run(tokens)
    targets = np.array([[-100, 5, 99]], np.int32)
    weights = np.array([[0.0, 1.0, 0.0]], np.float32)
    total, losses = model.engine.cross_entropy(targets, weights)
    assert np.isfinite(total)
    assert losses[0, 0] == 0.0
    weights[0, 2] = 1.0
    with pytest.raises(ValueError, match=r"targets\[2\] = 99 is out of range"):
        model.engine.cross_entropy(targets, weights)


def test_nan_weights_rejected(model):
    tokens = ids((1, 3))
    model.run(tokens)
    with pytest.raises(ValueError, match="weights contains a non-finite value"):
        model.engine.cross_entropy(tokens, np.array([[np.nan, 0, 0]], np.float32))


def test_kl_reference_shape(model):
    tokens = ids((1, 3))
    model.run(tokens)
    with pytest.raises(ValueError, match="ref_logits must have shape"):
        model.engine.kl_div(np.zeros((1, 3, 49), np.float32), np.ones((1, 3), np.float32))


@pytest.mark.parametrize("changes, message", [
    ({"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"norm": "batchnorm"}, "norm='batchnorm'"),
    ({"hidden_size": 0}, "hidden_size=0"),
])
def test_invalid_model_config(changes, message):
    values = dict(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=24)
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**values)


def test_engine_config_invalid_directly():
    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    raw = engine_config(config)
    raw["num_kv_heads"] = 3
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _core.Engine(raw)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"max_new_tokens": 8}, "exceeds max_position_embeddings"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"stop_ids": [99]}, "stop_ids"),
])
def test_generate_bad_arguments(model, kwargs, message):
    arguments = {"max_new_tokens": 2}
    arguments.update(kwargs)
    max_new = arguments.pop("max_new_tokens")
    with pytest.raises(ValueError, match=message):
        model.generate_ids([[1, 2, 3]], max_new, **arguments)


def test_generate_empty_prompt_list(model):
    with pytest.raises(ValueError, match="prompts is empty"):
        model.generate_ids([], 2)


def test_unknown_parameter_name():
    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    params = init_params(config)
    params["layers.7.q_proj.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match="unknown parameter names"):
        Model(config, params)
