"""The SKU pipeline on a tiny random model with the real tokenizer and real data.

The tiny model keeps these tests fast; tests/test_sku_real.py runs the real
SmolLM2 model.
"""
import dataclasses
import json
import math

import numpy as np
import pytest

from skupy.config import ModelConfig
from skupy.hf_io import load_hf
from skupy.model import init_params
from skupy.sku import SKU, TrainingDivergedError
from skupy.sku_config import SKUConfig

from .helpers import data_dir_or_skip, packaged_tokenizer_or_skip


@pytest.fixture(scope="module")
def tokenizer():
    return packaged_tokenizer_or_skip()


@pytest.fixture(scope="module")
def data():
    from skupy.data import load_sku_data

    full = load_sku_data(data_dir_or_skip())
    return dataclasses.replace(full, harmful_train=full.harmful_train[:40], harmful_test=full.harmful_test[:12],
                               normal_train=full.normal_train[:40], normal_test=full.normal_test[:12])


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config, init_params(config, seed=0, std=0.05), tokenizer


def small_config(**changes):
    values = dict(max_unlearn_steps=4, batch_size=2, num_random_answers=2, max_length=48, lr=1e-2, lora=True,
                  lora_rank=4, lora_alpha=8.0, template="sku", checkpoint_every=2, seed=3)
    values.update(changes)
    return SKUConfig.from_preset("smollm2-135m", **values)


def run_sku(tiny, data, out=None, **changes):
    sku = SKU(small_config(**changes), model=tiny, data=data, progress=False, eval_pairs=8)
    return sku.run(out, save_model=out is not None)


def test_run_writes_every_output(tiny, data, tmp_path):
    result = run_sku(tiny, data, tmp_path)

    for name in ("task_vector.safetensors", "harmful_lora.safetensors", "manifest.json", "log.jsonl",
                 "loss_curve.png", "evaluation.json", "unlearned/config.json", "unlearned/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    for record in log:
        assert all(math.isfinite(record[key]) for key in ("gd", "rd", "pd", "loss"))

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["data_sha256"]) == {"pku-saferlhf/train.jsonl", "pku-saferlhf/test.jsonl",
                                            "truthfulqa/TruthfulQA.csv"}
    assert manifest["config"]["max_unlearn_steps"] == 4
    assert "numpy" in manifest["versions"]

    _, saved = load_hf(tmp_path / "unlearned")
    for name, array in result.unlearned_params.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)


def test_lora_task_vector_touches_only_targets(tiny, data):
    result = run_sku(tiny, data)
    assert sorted(result.task_vector.deltas) == sorted(
        f"layers.{i}.{name}.weight" for i in range(2) for name in ("q_proj", "v_proj"))
    base = tiny[1]
    changed = [name for name in base if not np.array_equal(base[name], result.unlearned_params[name])]
    assert sorted(changed) == sorted(result.task_vector.deltas)


def test_full_finetuning_negation(tiny, data):
    config, base, tokenizer = tiny
    sku = SKU(small_config(lora=False, max_unlearn_steps=2), model=tiny, data=data, progress=False, eval_pairs=0)
    model = sku.build_model()
    result = sku.run(None)
    assert len(result.task_vector.deltas) == len(base)
    for name, delta in result.task_vector.deltas.items():
        np.testing.assert_allclose(result.unlearned_params[name], base[name] - delta, atol=1e-6)
    assert model is not None


def test_negation_lambda_scales_change(tiny, data):
    half = run_sku(tiny, data, negation_lambda=0.5)
    full = run_sku(tiny, data, negation_lambda=1.0)
    base = tiny[1]
    name = "layers.0.q_proj.weight"
    np.testing.assert_allclose(full.unlearned_params[name] - base[name],
                               2 * (half.unlearned_params[name] - base[name]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False])
def test_resume_after_interrupt_is_bitwise_identical(tiny, data, tmp_path, lora, monkeypatch):
    reference = run_sku(tiny, data, tmp_path / "whole", lora=lora)

    original_step = SKU.step

    def interrupted_step(self, model, optimizer, step, *rest):
        if step == 3:
            raise KeyboardInterrupt("simulated kill during step 3")
        return original_step(self, model, optimizer, step, *rest)

    monkeypatch.setattr(SKU, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run_sku(tiny, data, tmp_path / "split", lora=lora)
    monkeypatch.setattr(SKU, "step", original_step)
    assert (tmp_path / "split" / "checkpoints" / "step_0000002").is_dir()

    sku = SKU(small_config(lora=lora), model=tiny, data=data, progress=False, eval_pairs=8)
    resumed = sku.run(tmp_path / "split", resume=True)
    for name, array in reference.unlearned_params.items():
        assert np.array_equal(resumed.unlearned_params[name], array), name
    log = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_rerun_into_used_folder_needs_resume(tiny, data, tmp_path):
    run_sku(tiny, data, tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        run_sku(tiny, data, tmp_path)


def test_divergence_stops_with_step_and_module(tiny, data, tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"step \d+: the (GD|RD|PD)"):
        run_sku(tiny, data, tmp_path, lora=False, lr=1e30, checkpoint_every=1, max_unlearn_steps=6,
                weight_decay=0.0)
    checkpoints = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert checkpoints, "the last good checkpoint must be kept"
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["step"] >= 1


def test_k_larger_than_answer_pool(tiny, data):
    few = dataclasses.replace(data, harmful_train=data.harmful_train[:2])
    with pytest.raises(ValueError, match="num_random_answers"):
        SKU(small_config(num_random_answers=5), model=tiny, data=few, progress=False)


def test_gd_loss_falls_on_training_batches(tiny, data):
    result = run_sku(tiny, data, max_unlearn_steps=8, lr=3e-2)
    first = np.mean([record["gd"] for record in result.log[:2]])
    last = np.mean([record["gd"] for record in result.log[-2:]])
    assert last < first


def test_cli_reports_invalid_override(capsys):
    from skupy.cli import main

    code = main(["unlearn", "--preset", "smollm2-135m", "--set", "negation_lambda=nan", "--out", "unused"])
    assert code == 2
    assert "negation_lambda" in capsys.readouterr().err
