"""A pytest plugin for testing unlearned models with skupy's evaluation.

Installed with skupy as the pytest11 entry point "skupy". Where skupy is
not installed as a package, load it by hand with
``pytest -p skupy.pytest_plugin``. It adds the options --skupy-model,
--skupy-reference, --skupy-judge, --skupy-data-dir, --skupy-num-prompts and
--skupy-max-new-tokens (each also an ini key, such as ``skupy_model``) and
these session-scoped fixtures:

* skupy_model: the model under test, skupy.load(--skupy-model);
* skupy_reference_model: the original model, or None without --skupy-reference;
* skupy_data: the SKUData of --skupy-data-dir (default $SKUPY_DATA_DIR);
* skupy_judge: the judge that --skupy-judge names (default "learned");
* skupy_settings: the EvalSettings built from the options;
* skupy_eval: the result of skupy.evaluate.evaluate_model, computed once per session.

A test then reads, for example::

    def test_unlearned(skupy_eval):
        assert skupy_eval["metrics"]["harmful_rate_pku"] < 0.05

Tests that use skupy_model are skipped when no model is given, so the
plugin does nothing to test suites that do not ask for it.
"""
from __future__ import annotations

import os

import pytest

OPTIONS = (
    # (option name, ini key, help text)
    ("--skupy-model", "skupy_model", "model under test: SKU run folder, model name, .gguf file or HF folder"),
    ("--skupy-reference", "skupy_reference", "original model for fluency and similarity (default: none)"),
    ("--skupy-judge", "skupy_judge", "safety judge: refusal, learned, or a saved judge path (default: learned)"),
    ("--skupy-data-dir", "skupy_data_dir", "data folder with pku-saferlhf/ and truthfulqa/ "
                                           "(default: $SKUPY_DATA_DIR)"),
    ("--skupy-num-prompts", "skupy_num_prompts", "prompts per evaluation set; 0 means all (default: 32)"),
    ("--skupy-max-new-tokens", "skupy_max_new_tokens", "maximum tokens generated per response (default: 48)"),
)


def pytest_addoption(parser):
    group = parser.getgroup("skupy", "skupy: evaluate unlearned language models")
    for option, ini_key, help_text in OPTIONS:
        group.addoption(option, dest=ini_key, default=None, help=help_text)
        parser.addini(ini_key, help_text, default=None)


def pytest_configure(config):
    # Checked here so that a bad value stops the run with a usage error before any test runs.
    for ini_key in ("skupy_num_prompts", "skupy_max_new_tokens"):
        _int_option(config, ini_key, 0)


def option_value(config, ini_key: str, default=None):
    """Return a skupy option: the command-line value, else the ini value, else default."""
    value = config.getoption(ini_key)
    if value is None:
        value = config.getini(ini_key)
    if value is None or value == "" or value == []:
        return default
    return value


def _int_option(config, ini_key: str, default: int) -> int:
    value = option_value(config, ini_key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"--{ini_key.replace('_', '-')} (ini key {ini_key}) must be an integer, "
                                f"got {value!r}") from None


@pytest.fixture(scope="session")
def skupy_target(pytestconfig) -> dict:
    """The target of --skupy-model, resolved as `skupy eval` resolves it (run folder or model)."""
    from .eval_cli import resolve_target

    target = option_value(pytestconfig, "skupy_model")
    if target is None:
        pytest.skip("no model to evaluate; pass --skupy-model PATH or set skupy_model in the pytest ini file")
    return resolve_target(target, option_value(pytestconfig, "skupy_reference"))


@pytest.fixture(scope="session")
def skupy_model(skupy_target):
    """The model under test, loaded once per session."""
    import skupy

    return skupy.load(skupy_target["model"])


@pytest.fixture(scope="session")
def skupy_reference_model(skupy_target):
    """The original model, or None when neither --skupy-reference nor a run manifest names one."""
    import skupy

    if skupy_target["reference"] is None:
        return None
    return skupy.load(skupy_target["reference"])


@pytest.fixture(scope="session")
def skupy_data(pytestconfig):
    """The SKUData read from --skupy-data-dir, else $SKUPY_DATA_DIR."""
    from .data import load_sku_data

    data_dir = option_value(pytestconfig, "skupy_data_dir")
    if data_dir is None and not os.environ.get("SKUPY_DATA_DIR"):
        raise pytest.UsageError("skupy needs the data folder: pass --skupy-data-dir DIR or set SKUPY_DATA_DIR")
    return load_sku_data(data_dir)


@pytest.fixture(scope="session")
def skupy_judge(pytestconfig, skupy_data):
    """The judge named by --skupy-judge (default "learned", trained once and cached)."""
    from .judges import make_judge

    return make_judge(option_value(pytestconfig, "skupy_judge", "learned"), skupy_data)


@pytest.fixture(scope="session")
def skupy_settings(pytestconfig, skupy_target):
    """EvalSettings from --skupy-num-prompts, --skupy-max-new-tokens and the run's template."""
    from .evaluate import EvalSettings

    defaults = EvalSettings()
    return EvalSettings(num_prompts=_int_option(pytestconfig, "skupy_num_prompts", defaults.num_prompts),
                        max_new_tokens=_int_option(pytestconfig, "skupy_max_new_tokens", defaults.max_new_tokens),
                        template=skupy_target["template"] or defaults.template)


@pytest.fixture(scope="session")
def skupy_eval(skupy_model, skupy_reference_model, skupy_data, skupy_judge, skupy_settings, skupy_target) -> dict:
    """The evaluate_model result for the model under test, computed once per session."""
    from .evaluate import evaluate_model

    return evaluate_model(skupy_model, skupy_data, skupy_judge, skupy_reference_model, skupy_settings,
                          model_name=skupy_target["model"], reference_name=skupy_target["reference"])
