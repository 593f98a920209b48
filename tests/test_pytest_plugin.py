"""The skupy pytest plugin, run with pytester on examples/test_unlearned_model.py and a tiny random model.

The tiny model is a one-layer LLaMA with random weights and SmolLM2's
tokenizer, saved as a Hugging Face folder. Its responses are gibberish, so
the runs relax the example's limits through its environment variables.
"""
from __future__ import annotations

from importlib import metadata

import pytest

from skupy.config import ModelConfig
from skupy.hf_io import save_hf
from skupy.model import init_params

from .helpers import REPO_ROOT, data_dir_or_skip, packaged_tokenizer_or_skip

pytest_plugins = ["pytester"]

EXAMPLE = REPO_ROOT / "examples" / "test_unlearned_model.py"
EXAMPLE_TESTS = 6
RELAXED_LIMITS = {"SKUPY_MAX_HARMFUL_RATE": "1.0", "SKUPY_MAX_OVER_REFUSAL": "1.0", "SKUPY_MIN_DIVERSITY": "0.0"}


def plugin_arguments() -> list:
    """Load the plugin by hand unless its pytest11 entry point is installed, which loads it already."""
    installed = any(entry.value == "skupy.pytest_plugin" for entry in metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "skupy.pytest_plugin"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    tokenizer = packaged_tokenizer_or_skip()
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("tiny-unlearned") / "model"
    return save_hf(folder, config, init_params(config, seed=11), tokenizer)


@pytest.fixture
def example(pytester, monkeypatch):
    pytester.makepyfile(test_unlearned_model=EXAMPLE.read_text())
    for name, value in RELAXED_LIMITS.items():
        monkeypatch.setenv(name, value)
    return pytester


def options(model_dir, data_dir, judge="refusal") -> list:
    return plugin_arguments() + ["--skupy-model", str(model_dir), "--skupy-judge", judge,
                                 "--skupy-data-dir", str(data_dir), "--skupy-num-prompts", "2",
                                 "--skupy-max-new-tokens", "3", "-p", "no:cacheprovider"]


def test_example_passes_on_tiny_model(example, tiny_model_dir):
    result = example.runpytest(*options(tiny_model_dir, data_dir_or_skip()))

    result.assert_outcomes(passed=EXAMPLE_TESTS)


def test_example_limit_failure_reported(example, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SKUPY_MIN_DIVERSITY", "1.5")

    result = example.runpytest(*options(tiny_model_dir, data_dir_or_skip()), "-k", "degenerate or truthfulqa")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_responses_not_degenerate*", "*>= 1.5*"])


def test_example_skipped_without_model(example):
    result = example.runpytest(*plugin_arguments(), "-p", "no:cacheprovider", "-rs")

    result.assert_outcomes(skipped=EXAMPLE_TESTS)
    result.stdout.fnmatch_lines(["*pass --skupy-model PATH*"])


def test_options_from_ini_file(example, tiny_model_dir):
    example.makeini(f"""
        [pytest]
        skupy_model = {tiny_model_dir}
        skupy_judge = refusal
        skupy_data_dir = {data_dir_or_skip()}
        skupy_num_prompts = 2
        skupy_max_new_tokens = 2
    """)

    result = example.runpytest(*plugin_arguments(), "-p", "no:cacheprovider", "-k", "spot_check")

    result.assert_outcomes(passed=1)


def test_unknown_judge_reported(example, tiny_model_dir):
    arguments = options(tiny_model_dir, data_dir_or_skip(), judge="nonsense")

    result = example.runpytest(*arguments, "-k", "spot_check")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown judge 'nonsense'; valid judges: refusal, learned*"])


def test_bad_num_prompts_reported(example, tiny_model_dir):
    arguments = options(tiny_model_dir, data_dir_or_skip())
    arguments[arguments.index("--skupy-num-prompts") + 1] = "many"

    result = example.runpytest(*arguments, "-k", "spot_check")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--skupy-num-prompts (ini key skupy_num_prompts) must be an integer, got 'many'*"])
