"""A `skupy unlearn` process killed with SIGKILL or SIGINT resumes to bitwise-identical weights."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from skupy.config import ModelConfig
from skupy.hf_io import load_hf, save_hf
from skupy.model import init_params

from .helpers import data_dir_or_skip, packaged_tokenizer_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    tokenizer = packaged_tokenizer_or_skip()
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_hf(folder, config, init_params(config, seed=0, std=0.05), tokenizer)
    return folder


def unlearn_command(model_dir, out, resume=False):
    command = [sys.executable, "-m", "skupy.cli", "unlearn", "--preset", "smollm2-135m", "--model", str(model_dir),
               "--data-dir", str(data_dir_or_skip()), "--out", str(out), "--no-progress", "--threads", "1",
               "--set", "max_unlearn_steps=6", "--set", "checkpoint_every=1", "--set", "max_length=48",
               "--set", "K=2", "--set", "lora_rank=4", "--set", "template=sku", "--set", "lr=1e-2"]
    return command + (["--resume"] if resume else [])


def run_to_end(command):
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_identically(tiny_model_dir, tmp_path, signal_number):
    run_to_end(unlearn_command(tiny_model_dir, tmp_path / "whole"))

    out = tmp_path / "killed"
    process = subprocess.Popen(unlearn_command(tiny_model_dir, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    checkpoint = out / "checkpoints" / "step_0000002" / "state.json"
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.kill(process.pid, signal_number)
    process.wait(timeout=120)
    assert not (out / "unlearned").exists()

    run_to_end(unlearn_command(tiny_model_dir, out, resume=True))
    _, expected = load_hf(tmp_path / "whole" / "unlearned")
    _, resumed = load_hf(out / "unlearned")
    for name, array in expected.items():
        assert np.array_equal(resumed[name], array), name
