"""Tests of skupy.sku_config: defaults, presets, files, overrides and validation."""
import json

import pytest

from skupy.sku_config import PRESETS, SKUConfig, describe_presets, field_names


def test_defaults_are_paper_settings():
    config = SKUConfig()
    assert (config.bad_weight, config.random_weight, config.normal_weight) == (2.5, 2.5, 1.0)
    assert config.lr == 2e-4
    assert config.max_unlearn_steps == 1000
    assert config.batch_size == 2
    assert config.num_random_answers == 5
    assert config.lora is False
    assert config.negation_lambda == 1.0
    assert config.template == "sku"


def test_preset_opt_2_7b():
    config = SKUConfig.from_preset("opt-2.7b")
    assert config.model == "facebook/opt-2.7b"
    assert (config.bad_weight, config.random_weight, config.normal_weight) == (2.5, 2.5, 1.0)
    assert config.lr == 2e-4
    assert config.max_unlearn_steps == 1000
    assert config.batch_size == 2
    assert config.lora is False


def test_preset_llama2_7b_lora():
    config = SKUConfig.from_preset("llama2-7b")
    assert config.lora is True
    assert (config.lora_rank, config.lora_alpha) == (32, 16.0)
    assert config.lora_targets == ("q_proj", "v_proj")
    assert config.lr == 2e-4
    assert config.bad_weight == 2.5


def test_preset_reference_code_defaults():
    config = SKUConfig.from_preset("reference-code-defaults")
    assert (config.bad_weight, config.random_weight, config.normal_weight) == (0.5, 1.0, 1.0)
    assert config.lr == 2e-5


def test_preset_smollm2_small_scale():
    config = SKUConfig.from_preset("smollm2-135m")
    assert config.model == "smollm2-135m-instruct"
    assert config.lora is True
    assert (config.lora_rank, config.lora_alpha) == (32, 16.0)
    assert config.batch_size == 2
    assert config.max_length == 128
    assert 1 <= config.num_random_answers <= 5
    assert 60 <= config.max_unlearn_steps <= 100


def test_presets_state_their_source():
    for name, preset in PRESETS.items():
        assert preset["description"], name
        SKUConfig.from_preset(name)
    assert "paper" in PRESETS["opt-2.7b"]["description"]
    assert "published SKU code" in PRESETS["reference-code-defaults"]["description"]
    assert "not from the paper" in PRESETS["smollm2-135m"]["description"]
    assert describe_presets().count("\n") == len(PRESETS) - 1


def test_preset_with_changes():
    config = SKUConfig.from_preset("opt-2.7b", lr=1e-5)
    assert config.lr == 1e-5
    assert config.model == "facebook/opt-2.7b"


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown SKU preset 'gpt-5'; available: opt-2.7b"):
        SKUConfig.from_preset("gpt-5")


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    config = SKUConfig.from_preset("smollm2-135m").apply_overrides(["lr=3e-4", "data_dir=/data/sku", "seed=9"])
    path = tmp_path / f"config{suffix}"
    config.to_file(path)
    assert SKUConfig.from_file(path) == config


def test_file_json_contents(tmp_path):
    path = tmp_path / "config.json"
    SKUConfig().to_file(path)
    values = json.loads(path.read_text())
    assert list(values) == field_names()
    assert values["lora_targets"] == ["q_proj", "v_proj"]


def test_file_alias_k_and_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: llama2-7b\nK: 3\nlr: 2e-4\nlora_rank: 8\n")
    config = SKUConfig.from_file(path)
    assert config.num_random_answers == 3
    assert config.lr == 2e-4
    assert config.lora_rank == 8
    assert config.lora is True
    assert config.model == "meta-llama/Llama-2-7b-hf"


def test_file_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError) as caught:
        SKUConfig.from_file(path)
    message = str(caught.value)
    assert "run.yaml" in message
    assert "unknown SKUConfig key 'learning_rate'" in message
    assert "lr" in message
    assert "num_random_answers" in message


def test_file_alias_and_field_both_given(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"K": 2, "num_random_answers": 3}))
    with pytest.raises(ValueError, match="given twice"):
        SKUConfig.from_file(path)


def test_file_not_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- lr\n- 0.1\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        SKUConfig.from_file(path)


def test_file_empty_gives_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("")
    assert SKUConfig.from_file(path) == SKUConfig()


def test_file_unsupported_suffix(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("lr = 1\n")
    with pytest.raises(ValueError, match="unsupported config file type '.toml'"):
        SKUConfig.from_file(path)
    with pytest.raises(ValueError, match="unsupported config file type"):
        SKUConfig().to_file(path)


def test_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        SKUConfig.from_file(tmp_path / "absent.yaml")


def test_overrides_convert_types():
    base = SKUConfig()
    config = base.apply_overrides(["lr=1e-4", "lora_rank=8", "lora=yes", "K=2", "data_dir=/tmp/data",
                                   "lora_targets=q_proj, k_proj", "negation_lambda=-0.5", "template=chat",
                                   "max_unlearn_steps=1e3"])
    assert config.lr == 1e-4
    assert isinstance(config.lora_rank, int) and config.lora_rank == 8
    assert config.lora is True
    assert config.num_random_answers == 2
    assert config.data_dir == "/tmp/data"
    assert config.lora_targets == ("q_proj", "k_proj")
    assert config.negation_lambda == -0.5
    assert config.template == "chat"
    assert config.max_unlearn_steps == 1000
    assert base == SKUConfig()


@pytest.mark.parametrize("text, expected", [("true", True), ("On", True), ("1", True), ("no", False),
                                            ("FALSE", False), ("0", False)])
def test_overrides_bool_words(text, expected):
    assert SKUConfig().apply_overrides([f"lora={text}"]).lora is expected


def test_overrides_none_for_optional():
    config = SKUConfig(data_dir="/x").apply_overrides(["data_dir=null"])
    assert config.data_dir is None


@pytest.mark.parametrize("override, fragment", [
    ("lr", "must have the form key=value"),
    ("rate=1", "unknown SKUConfig key 'rate'"),
    ("lora=maybe", "lora must be true or false"),
    ("batch_size=2.5", "batch_size must be an integer"),
    ("lr=fast", "lr must be a number"),
])
def test_overrides_invalid(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        SKUConfig().apply_overrides([override])


@pytest.mark.parametrize("field, value, fragment", [
    ("lr", 0.0, "lr=0.0 must be a finite number > 0"),
    ("lr", float("inf"), "lr=inf must be a finite number > 0"),
    ("negation_lambda", float("nan"), "negation_lambda=nan must be a finite number"),
    ("bad_weight", float("inf"), "bad_weight=inf must be a finite number >= 0"),
    ("random_weight", -1.0, "random_weight=-1.0 must be a finite number >= 0"),
    ("normal_weight", float("nan"), "normal_weight=nan must be a finite number"),
    ("num_random_answers", 0, r"num_random_answers \(K\)=0 must be an integer >= 1"),
    ("max_unlearn_steps", 0, "max_unlearn_steps=0 must be an integer >= 1"),
    ("batch_size", 0, "batch_size=0 must be an integer >= 1"),
    ("batch_size", True, "batch_size=True must be an integer >= 1"),
    ("template", "plain", "template='plain' must be one of sku, chat"),
    ("lora_targets", ("q_proj", "attn"), "lora_targets entry 'attn'"),
    ("lora_targets", (), "must name at least one layer"),
    ("lora_rank", 0, "lora_rank=0 must be an integer >= 1"),
    ("adam_beta2", 1.0, "adam_beta2=1.0 must lie in"),
    ("max_length", 1, "max_length=1 must be an integer >= 2"),
    ("log_every", 0, "log_every=0 must be an integer >= 1"),
    ("model", "", "model='' must be a non-empty string"),
])
def test_validation_errors(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        SKUConfig(**{field: value})
