"""bfloat16 storage of frozen block weights: same results as float32 weights of the same values."""
import numpy as np
import pytest

from skupy.config import ModelConfig
from skupy.model import Model, from_bfloat16, init_params, is_block_linear_weight, to_bfloat16


@pytest.fixture()
def setup():
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=96, max_position_embeddings=64, lora_rank=4)
    params = init_params(config, seed=1, std=0.1)
    rng = np.random.default_rng(2)
    for name in params:
        if name.endswith("lora_B"):
            params[name] = (rng.standard_normal(params[name].shape) * 0.1).astype(np.float32)
    as_bf16 = {n: (to_bfloat16(a) if is_block_linear_weight(n) else a) for n, a in params.items()}
    widened = {n: (from_bfloat16(a) if a.dtype == np.uint16 else a) for n, a in as_bf16.items()}
    tokens = rng.integers(0, 300, (2, 10))
    return config, as_bf16, widened, tokens


def test_rounding_is_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5], np.float32)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7 and rounds to the even mantissa, 1.0;
    # 1 + 3 * 2^-8 is a tie between 1 + 2^-7 and 1 + 2^-6 and rounds to 1 + 2^-6
    expected = np.array([1.0, 1.0, 1.015625, -2.5], np.float32)
    np.testing.assert_array_equal(from_bfloat16(to_bfloat16(values)), expected)


def test_forward_and_lora_gradients_match_widened_weights(setup):
    config, as_bf16, widened, tokens = setup
    compact, reference = Model(config, as_bf16, trainable="lora"), Model(config, widened, trainable="lora")
    np.testing.assert_array_equal(compact.forward(tokens), reference.forward(tokens))

    weights = np.full(tokens.shape, 1.0 / tokens.size, np.float32)
    compact.accumulate_ce(tokens, tokens, weights)
    reference.accumulate_ce(tokens, tokens, weights)
    for name in reference.grads:
        np.testing.assert_array_equal(compact.grads[name], reference.grads[name], err_msg=name)


def test_generation_and_recompute_with_bfloat16(setup):
    config, as_bf16, widened, tokens = setup
    compact = Model(config, as_bf16, trainable="lora", recompute=True)
    reference = Model(config, widened, trainable="lora")
    assert compact.generate_ids([[1, 2, 3]], 6) == reference.generate_ids([[1, 2, 3]], 6)
    weights = np.full(tokens.shape, 1.0 / tokens.size, np.float32)
    compact.accumulate_ce(tokens, tokens, weights)
    reference.accumulate_ce(tokens, tokens, weights)
    for name in reference.grads:
        np.testing.assert_array_equal(compact.grads[name], reference.grads[name], err_msg=name)


def test_bfloat16_weights_cannot_be_trained(setup):
    config, as_bf16, _, _ = setup
    with pytest.raises(ValueError, match="frozen weights only"):
        Model(config, as_bf16, trainable="all")


def test_bfloat16_only_for_block_linear_weights(setup):
    config, as_bf16, _, _ = setup
    bad = dict(as_bf16)
    bad["layers.0.attn_norm.weight"] = to_bfloat16(bad["layers.0.attn_norm.weight"])
    with pytest.raises(ValueError, match="only block linear weights"):
        Model(config, bad, trainable="lora")


def test_engine_rejects_gradient_for_bfloat16_weight(setup):
    config, as_bf16, _, tokens = setup
    model = Model(config, as_bf16, trainable="lora")
    model.run(tokens)
    weights = np.full(tokens.shape, 0.01, np.float32)
    model.engine.cross_entropy(np.asarray(tokens, np.int32), weights, 1.0)
    grads = [np.zeros(a.shape, np.float32) if a.dtype == np.uint16 else None for a in model.param_list()]
    with pytest.raises(ValueError, match="frozen weights only"):
        model.engine.backward(model.param_list(), grads)
