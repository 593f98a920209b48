"""Task vectors: construction, arithmetic, negation and files."""
import math

import numpy as np
import pytest

from skupy import _core
from skupy.task_vector import TaskVector


def weights(seed, shapes=None):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"a.weight": (4, 6), "b.weight": (5,), "c.bias": (3,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_from_weights_is_difference():
    original, harmful = weights(0), weights(1)
    tau = TaskVector.from_weights(harmful, original)
    for name in original:
        np.testing.assert_allclose(tau.deltas[name], harmful[name] - original[name], rtol=0, atol=1e-6)


def test_negation_gives_original_minus_lambda_tau():
    original, harmful = weights(0), weights(1)
    tau = TaskVector.from_weights(harmful, original)
    unlearned = tau.negate_into(original, 0.75)
    for name in original:
        expected = original[name] - 0.75 * (harmful[name] - original[name])
        np.testing.assert_allclose(unlearned[name], expected, rtol=1e-6, atol=1e-6)
    # the original stays untouched
    np.testing.assert_array_equal(original["a.weight"], weights(0)["a.weight"])


def test_lambda_one_negation_reflects_harmful_model():
    original, harmful = weights(0), weights(1)
    unlearned = TaskVector.from_weights(harmful, original).negate_into(original, 1.0)
    for name in original:
        np.testing.assert_allclose(unlearned[name] + harmful[name], 2 * original[name], atol=1e-5)


def test_apply_in_place_updates_arrays():
    original, harmful = weights(0), weights(1)
    tau = TaskVector.from_weights(harmful, original)
    target = {name: array.copy() for name, array in original.items()}
    arrays_before = {name: id(array) for name, array in target.items()}
    tau.apply_to(target, 1.0, inplace=True)
    for name in original:
        assert id(target[name]) == arrays_before[name]
        np.testing.assert_allclose(target[name], harmful[name], atol=1e-5)


def test_from_lora_equals_merged_delta():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 6)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    tau = TaskVector.from_lora({"layers.0.q_proj.lora_A": a, "layers.0.q_proj.lora_B": b}, scale=16 / 3)
    np.testing.assert_allclose(tau.deltas["layers.0.q_proj.weight"], (b @ a) * (16 / 3), rtol=1e-5, atol=1e-5)


def test_lora_merge_matches_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    a = rng.standard_normal((2, 7)).astype(np.float32)
    b = rng.standard_normal((5, 2)).astype(np.float32)
    expected = w + 0.5 * b @ a
    _core.lora_merge(w, a, b, 0.5)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-5)


def test_scaled_negated_and_sum():
    original, harmful = weights(0), weights(1)
    tau = TaskVector.from_weights(harmful, original)
    total = tau + (-tau).scaled(0.5)
    for name in original:
        np.testing.assert_allclose(total.deltas[name], 0.5 * tau.deltas[name], atol=1e-6)
    assert math.isclose((-tau).norm(), tau.norm(), rel_tol=1e-9)


def test_save_and_load_round_trip(tmp_path):
    tau = TaskVector.from_weights(weights(1), weights(0))
    path = tmp_path / "tv.safetensors"
    tau.save(path)
    loaded = TaskVector.load(path)
    assert sorted(loaded.deltas) == sorted(tau.deltas)
    for name in tau.deltas:
        np.testing.assert_array_equal(loaded.deltas[name], tau.deltas[name])
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lambda_rejected(value):
    tau = TaskVector.from_weights(weights(1), weights(0))
    with pytest.raises(ValueError, match="negation_lambda must be a finite number"):
        tau.negate_into(weights(0), value)


def test_shape_mismatch_rejected():
    original = weights(0)
    harmful = dict(weights(1))
    harmful["a.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="a.weight"):
        TaskVector.from_weights(harmful, original)


def test_missing_parameter_rejected():
    tau = TaskVector.from_weights(weights(1), weights(0))
    with pytest.raises(ValueError, match="lacks|model lacks"):
        tau.apply_to({"a.weight": np.zeros((4, 6), np.float32)}, -1.0)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="task vector file not found"):
        TaskVector.load(tmp_path / "absent.safetensors")


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="cannot read task vector"):
        TaskVector.load(path)
