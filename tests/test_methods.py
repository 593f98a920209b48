"""Unlearning methods of skupy.methods on a tiny random model with the real tokenizer and real data.

The training data is cut to one batch of two harmful and two normal pairs,
so every step trains on the pairs whose NLL the tests measure.
"""
import dataclasses
import json
import math

import numpy as np
import pytest

from skupy import methods
from skupy.batching import make_lm_batch
from skupy.config import ModelConfig
from skupy.hf_io import load_hf
from skupy.model import Model, init_params
from skupy.sku import answer_nll
from skupy.sku_config import SKUConfig

from .helpers import data_dir_or_skip, packaged_tokenizer_or_skip


@pytest.fixture(scope="module")
def tokenizer():
    return packaged_tokenizer_or_skip()


@pytest.fixture(scope="module")
def full_data():
    from skupy.data import load_sku_data

    return load_sku_data(data_dir_or_skip())


@pytest.fixture(scope="module")
def data(full_data):
    return dataclasses.replace(full_data, harmful_train=full_data.harmful_train[:2],
                               normal_train=full_data.normal_train[:2], harmful_test=full_data.harmful_test[:4],
                               normal_test=full_data.normal_test[:4])


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return config, init_params(config, seed=0), tokenizer


def tiny_config(**changes):
    values = dict(template="sku", max_length=64, batch_size=2, num_random_answers=2, max_unlearn_steps=2, lr=1e-2,
                  weight_decay=0.0, lora=False, lora_rank=4, lora_alpha=8.0, seed=0)
    values.update(changes)
    return SKUConfig(**values)


def make(name, tiny, data, **changes):
    return methods.build_method(name, tiny_config(**changes), model=tiny, data=data, progress=False, eval_pairs=0)


def nll(tiny, params, encoded, pad_id):
    return answer_nll(Model(tiny[0], params, trainable=[]), encoded, pad_id)


NEGATION_METHODS = ["sku", "sku_no_gd", "sku_no_rd", "sku_no_pd", "tv"]
UNLEARNING_METHODS = ["ga", "ga_mismatch", "llmu", "npo"]
CASES = ([(name, False) for name in NEGATION_METHODS + UNLEARNING_METHODS + ["ft"]]
         + [("sku", True), ("llmu", True), ("npo", True)])


@pytest.mark.parametrize("name,lora", CASES, ids=[f"{n}-{'lora' if l else 'full'}" for n, l in CASES])
def test_method_moves_weights_expected_way(name, lora, tiny, data):
    method = make(name, tiny, data, lora=lora)
    result = method.run()
    base = tiny[1]
    harmful_before = nll(tiny, base, method.harmful, method.pad_id)
    harmful_after = nll(tiny, result.final_params, method.harmful, method.pad_id)
    normal_before = nll(tiny, base, method.normal, method.pad_id)
    normal_after = nll(tiny, result.final_params, method.normal, method.pad_id)

    assert result.method == name
    assert len(result.log) == 2
    assert result.negates == (name in NEGATION_METHODS)
    if name == "ft":
        assert normal_after < normal_before - 1e-3
    else:
        assert harmful_after > harmful_before + 1e-3
    if result.negates:
        # The harmful model theta_0 + tau learned the harmful answers that negation removes.
        harmful_model = result.task_vector.apply_to(base, 1.0)
        assert nll(tiny, harmful_model, method.harmful, method.pad_id) < harmful_before - 1e-3


def test_ablations_zero_their_terms(tiny, data):
    expected = {"sku_no_gd": "bad_weight", "sku_no_rd": "random_weight", "sku_no_pd": "normal_weight"}
    for name, field in expected.items():
        method = make(name, tiny, data)
        assert getattr(method.config, field) == 0.0, name
    plain = make("tv", tiny, data)
    assert plain.config.random_weight == 0.0
    assert plain.config.normal_weight == 0.0
    assert plain.config.bad_weight == tiny_config().bad_weight


def test_methods_see_same_batches(tiny, full_data):
    # Eight harmful pairs, so the batch order matters; at step 1 both models are theta_0.
    data = dataclasses.replace(full_data, harmful_train=full_data.harmful_train[:8],
                               normal_train=full_data.normal_train[:8])
    sku_log = make("tv", tiny, data, max_unlearn_steps=1).run().log
    ga_log = make("ga", tiny, data, max_unlearn_steps=1).run().log
    assert ga_log[0]["harmful_nll"] == pytest.approx(sku_log[0]["gd"], rel=1e-6)


def test_direct_run_writes_outputs(tiny, data, tmp_path):
    result = make("ga", tiny, data, lora=True).run(tmp_path)

    for name in ("weight_delta.safetensors", "trained_lora.safetensors", "manifest.json", "log.jsonl",
                 "loss_curve.png", "evaluation.json", "unlearned/config.json", "unlearned/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "task_vector.safetensors").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == "ga"
    assert manifest["negation"] is False
    assert manifest["method_weights"] == {"ga": 1.0}
    assert manifest["weight_delta_norm"] > 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2]

    _, saved = load_hf(tmp_path / "unlearned")
    for name, array in result.final_params.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)


def test_negation_run_manifest_names_method(tiny, data, tmp_path):
    make("sku_no_rd", tiny, data).run(tmp_path, save_model=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == "sku_no_rd"
    assert manifest["negation"] is True
    assert manifest["config"]["random_weight"] == 0.0
    assert (tmp_path / "task_vector.safetensors").is_file()


def test_direct_run_resumes_identically(tiny, data, tmp_path):
    reference = make("llmu", tiny, data, max_unlearn_steps=3).run(tmp_path / "whole", save_model=False)
    # checkpoint_every=2 leaves one checkpoint, after step 2, so resuming redoes step 3.
    make("llmu", tiny, data, max_unlearn_steps=3, checkpoint_every=2).run(tmp_path / "split", save_model=False)
    resumed = make("llmu", tiny, data, max_unlearn_steps=3, checkpoint_every=2).run(
        tmp_path / "split", resume=True, save_model=False)
    for name, array in reference.final_params.items():
        np.testing.assert_array_equal(resumed.final_params[name], array, err_msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_npo_first_step_equals_ga(tiny, data):
    method = make("npo", tiny, data, max_unlearn_steps=1)
    record = method.run().log[0]
    beta = method.weights["beta"]
    assert record["npo_weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert record["npo"] == pytest.approx(2.0 / beta * math.log(2.0), rel=1e-5)


def test_npo_gradient_matches_finite_difference(tiny, data):
    method = make("npo", tiny, data, lora=True)
    model = method.build_model()
    rng = np.random.default_rng(1)
    for name in model.lora_names():
        if name.endswith(".lora_B"):
            model.params[name][...] = rng.standard_normal(model.params[name].shape).astype(np.float32) * 0.3
    batch = make_lm_batch(method.harmful, method.pad_id)

    model.zero_grad()
    record = {}
    method.accumulate_terms(model, 1, np.arange(len(method.harmful)), np.arange(len(method.normal)), record)
    assert record["npo_weight_mean"] != pytest.approx(1.0, abs=1e-3), "the check needs theta != theta_0"
    gradient = {name: grad.copy() for name, grad in model.grads.items()}
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gradient.values()))
    epsilon = 1e-2

    def loss_at(sign):
        saved = {name: model.params[name].copy() for name in gradient}
        for name, grad in gradient.items():
            model.params[name] += (sign * epsilon * grad / norm).astype(np.float32)
        value = method.npo_loss(method.sequence_log_ratios(model, batch)[0])
        for name, array in saved.items():
            model.params[name][...] = array
        return value

    directional = (loss_at(1.0) - loss_at(-1.0)) / (2 * epsilon)
    assert directional == pytest.approx(norm, rel=0.05)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="valid methods: sku, sku_no_gd") as error:
        methods.get_method("gradient_ascent")
    for name in methods.METHODS:
        assert name in str(error.value)


def test_parse_method_names_bad_input():
    assert methods.parse_method_names("ga, tv,ga") == ["ga", "tv"]
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        methods.parse_method_names("ga,bogus")
    with pytest.raises(ValueError, match="no method given"):
        methods.parse_method_names(" , ")


def test_bad_weights_rejected(tiny, data):
    with pytest.raises(ValueError, match="no weight or setting 'gd'"):
        methods.build_method("llmu", tiny_config(), model=tiny, data=data, weights={"gd": 1.0})
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        methods.build_method("ga", tiny_config(), model=tiny, data=data, weights={"ga": float("nan")})
    with pytest.raises(ValueError, match="switches the GD term off"):
        methods.build_method("sku_no_gd", tiny_config(), model=tiny, data=data, weights={"gd": 1.0})
    with pytest.raises(ValueError, match="beta must be > 0"):
        methods.build_method("npo", tiny_config(), model=tiny, data=data, weights={"beta": 0.0})


def test_weights_override_defaults(tiny, data):
    method = methods.build_method("llmu", tiny_config(), model=tiny, data=data, weights={"kl": 0.25})
    assert method.weights == {"ga": 0.5, "mismatch": 1.0, "kl": 0.25}
    sku = methods.build_method("sku", tiny_config(), model=tiny, data=data, weights={"rd": 0.5})
    assert sku.config.random_weight == 0.5


def test_mismatch_k_larger_than_normal_pool(tiny, full_data):
    data = dataclasses.replace(full_data, harmful_train=full_data.harmful_train[:8],
                               normal_train=full_data.normal_train[:2])
    with pytest.raises(ValueError, match="distinct normal answers"):
        make("ga_mismatch", tiny, data, num_random_answers=3)
