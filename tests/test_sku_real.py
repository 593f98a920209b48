"""A short SKU run on the real SmolLM2-135M-Instruct with real PKU-SafeRLHF and TruthfulQA data.

The run keeps the smollm2-135m preset's loss weights, learning rate and step count, and cuts the
cost per step: 64 harmful training pairs, K = 2 and sequences of at most 96 tokens.
"""
import numpy as np
import dataclasses

import pytest

from skupy.sku import SKU, answer_nll, encode_fitting
from skupy.sku_config import SKUConfig
from skupy.model import Model

from .helpers import data_dir_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run():
    from skupy.checkpoint import load_checkpoint
    from skupy.data import load_sku_data
    from skupy.gguf_io import find_packaged_gguf

    try:
        find_packaged_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model = load_checkpoint("smollm2-135m-instruct")
    data = load_sku_data(data_dir_or_skip())
    data = dataclasses.replace(data, harmful_train=data.harmful_train[:64])
    config = SKUConfig.from_preset("smollm2-135m", max_length=96, num_random_answers=2)
    sku = SKU(config, model=model, data=data, progress=False, eval_pairs=32)
    trained = {}

    original_task_vector = SKU.task_vector

    def keep_trained_model(self, trained_model):
        trained["model"] = trained_model
        return original_task_vector(self, trained_model)

    SKU.task_vector = keep_trained_model
    try:
        result = sku.run(None)
    finally:
        SKU.task_vector = original_task_vector
    return sku, result, trained["model"]


def test_stage1_lowers_harmful_nll_on_training_pairs(run):
    sku, _, trained = run
    config, base_params, tokenizer = sku.base_config, sku.base_params, sku.tokenizer
    _, encoded = encode_fitting(tokenizer, sku.data.harmful_train[:16], sku.config)
    before = answer_nll(Model(config, base_params, trainable=[]), encoded, sku.pad_id)
    after = answer_nll(trained, encoded, sku.pad_id)
    assert after < before


def test_guided_distortion_loss_falls(run):
    _, result, _ = run
    gd = np.array([record["gd"] for record in result.log])
    assert gd[-20:].mean() < gd[:20].mean()


def test_negation_raises_heldout_harmful_nll(run):
    _, result, _ = run
    evaluation = result.evaluation
    assert evaluation["unlearned"]["harmful_nll"] > evaluation["original"]["harmful_nll"]


def test_heldout_normal_nll_rises_less(run):
    _, result, _ = run
    evaluation = result.evaluation
    assert evaluation["normal_nll_change"] < evaluation["harmful_nll_change"]


def test_losses_are_logged_for_every_step(run):
    sku, result, _ = run
    assert [record["step"] for record in result.log] == list(range(1, sku.config.max_unlearn_steps + 1))
    assert all(record["pd"] <= 1e-6 for record in result.log)  # PD = -KL, and KL >= 0
