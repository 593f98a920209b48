"""Tests for skupy.hf_io: HF folder round trips, and exact agreement with transformers."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from skupy.checkpoint import CheckpointError
from skupy.config import ModelConfig
from skupy.hf_io import (
    config_from_hf,
    hf_config_from_model_config,
    load_hf,
    save_hf,
    to_hf_state_dict,
)
from skupy.layout import param_specs

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def llama_config(**changes) -> ModelConfig:
    values = dict(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48, max_position_embeddings=128, norm_eps=1e-6, rope_theta=50000.0,
                  bos_token_id=1, eos_token_id=2)
    values.update(changes)
    return ModelConfig(**values)


def gpt2_config(**changes) -> ModelConfig:
    values = dict(arch="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128,
                  max_position_embeddings=40, norm="layernorm", activation="gelu_tanh", position="learned",
                  tie_word_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                  bos_token_id=0, eos_token_id=0)
    values.update(changes)
    return ModelConfig(**values)


def opt_config(**changes) -> ModelConfig:
    values = dict(arch="opt", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                  max_position_embeddings=40, norm="layernorm", activation="relu", position="learned",
                  position_offset=2, tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
                  mlp_bias=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    values.update(changes)
    return ModelConfig(**values)


CONFIGS = {
    "llama": llama_config(),
    "llama_tied_bias_scaled": llama_config(
        tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "gpt2": gpt2_config(),
    "gpt2_untied": gpt2_config(tie_word_embeddings=False),
    "opt_pre_norm": opt_config(),
    "opt_post_norm_projected": opt_config(pre_norm=False, final_norm=False, word_embed_proj_dim=16),
    "opt_no_bias": opt_config(attention_bias=False, attention_out_bias=False, mlp_bias=False),
}


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in param_specs(config)}


def assert_params_equal(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == np.float32, name
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


CONFIG_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "max_position_embeddings", "norm", "norm_eps", "activation", "position",
                 "position_offset", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
                 "attention_out_bias", "mlp_bias", "pre_norm", "final_norm", "word_embed_proj_dim",
                 "bos_token_id", "eos_token_id", "pad_token_id")


# --------------------------------------------------------------------------- numpy-only round trips


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_save_then_load_is_exact(tmp_path, case):
    config = CONFIGS[case]
    params = random_params(config)

    save_hf(tmp_path / "model", config, params)
    loaded_config, loaded = load_hf(tmp_path / "model")

    assert_params_equal(loaded, params)
    for field in CONFIG_FIELDS:
        assert getattr(loaded_config, field) == getattr(config, field), field


def test_tied_weights_written_once(tmp_path):
    config = gpt2_config()
    save_hf(tmp_path / "model", config, random_params(config))

    names = set(safetensors_numpy.load_file(tmp_path / "model" / "model.safetensors"))

    assert "transformer.wte.weight" in names
    assert "lm_head.weight" not in names


def test_gpt2_conv1d_layout(tmp_path):
    config = gpt2_config()
    params = random_params(config)
    state = to_hf_state_dict(config, params)

    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    np.testing.assert_array_equal(state["transformer.h.0.attn.c_attn.weight"][:, 32:64],
                                  params["layers.0.k_proj.weight"].T)
    np.testing.assert_array_equal(state["transformer.h.0.attn.c_attn.bias"][64:], params["layers.0.v_proj.bias"])
    np.testing.assert_array_equal(state["transformer.h.1.mlp.c_fc.weight"], params["layers.1.up_proj.weight"].T)


def test_config_json_contents(tmp_path):
    config = llama_config()
    save_hf(tmp_path / "model", config, random_params(config))

    written = json.loads((tmp_path / "model" / "config.json").read_text())
    generation = json.loads((tmp_path / "model" / "generation_config.json").read_text())

    assert written["architectures"] == ["LlamaForCausalLM"]
    assert written["model_type"] == "llama"
    assert written["torch_dtype"] == "float32"
    assert written["num_key_value_heads"] == 2
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_lora_params_not_saved(tmp_path):
    config = llama_config(lora_rank=2)
    params = random_params(config)
    assert any(name.endswith(".lora_A") for name in params)

    save_hf(tmp_path / "model", config, params)
    names = set(safetensors_numpy.load_file(tmp_path / "model" / "model.safetensors"))

    assert not any("lora" in name for name in names)


def test_save_rejects_wrong_shape(tmp_path):
    config = llama_config()
    params = random_params(config)
    params["layers.0.q_proj.weight"] = np.zeros((3, 3), dtype=np.float32)

    with pytest.raises(CheckpointError, match=r"layers\.0\.q_proj\.weight has shape \(3, 3\)"):
        save_hf(tmp_path / "model", config, params)
    assert not (tmp_path / "model").exists()


def test_save_rejects_config_hf_cannot_express(tmp_path):
    config = llama_config(attention_bias=True, attention_out_bias=False)

    with pytest.raises(CheckpointError, match="LlamaConfig has one flag"):
        save_hf(tmp_path / "model", config, random_params(config))


def test_save_replaces_existing_folder(tmp_path):
    config = llama_config()
    first, second = random_params(config, seed=1), random_params(config, seed=2)
    save_hf(tmp_path / "model", config, first)
    (tmp_path / "model" / "stale.txt").write_text("old")

    save_hf(tmp_path / "model", config, second)

    _config, loaded = load_hf(tmp_path / "model")
    assert_params_equal(loaded, second)
    assert not (tmp_path / "model" / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_failed_save_keeps_old_folder(tmp_path):
    config = llama_config()
    params = random_params(config, seed=1)
    save_hf(tmp_path / "model", config, params)

    class BrokenTokenizer:
        def save(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(tmp_path / "model", config, random_params(config, seed=2), tokenizer=BrokenTokenizer())

    _config, loaded = load_hf(tmp_path / "model")
    assert_params_equal(loaded, params)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_sharded_folder_loads(tmp_path):
    config = llama_config()
    params = random_params(config)
    save_hf(tmp_path / "single", config, params)
    state = safetensors_numpy.load_file(tmp_path / "single" / "model.safetensors")

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:7], "model-00002-of-00002.safetensors": names[7:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        safetensors_numpy.save_file({name: state[name] for name in shard_names}, folder / shard,
                                    metadata={"format": "pt"})
        weight_map.update({name: shard for name in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    _config, loaded = load_hf(folder)

    assert_params_equal(loaded, params)


def write_bfloat16_safetensors(path, tensors: dict):
    """Write float32 arrays as BF16 by hand, because numpy and safetensors.numpy have no bfloat16."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        bits = (np.ascontiguousarray(value, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(bits)]}
        blobs.append(bits)
        offset += len(bits)
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs))


def test_bfloat16_weights_load(tmp_path):
    config = llama_config()
    params = random_params(config)
    save_hf(tmp_path / "model", config, params)
    state = safetensors_numpy.load_file(tmp_path / "model" / "model.safetensors")
    # Values with zero low mantissa bits are exact in bfloat16.
    rounded = {name: (value.view(np.uint32) & 0xFFFF0000).view(np.float32) for name, value in state.items()}
    write_bfloat16_safetensors(tmp_path / "model" / "model.safetensors", rounded)

    _config, loaded = load_hf(tmp_path / "model")

    expected = {name: (value.view(np.uint32) & 0xFFFF0000).view(np.float32) for name, value in params.items()}
    assert_params_equal(loaded, expected)


def test_llama_mlp_bias_rejected():
    source = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 8, "mlp_bias": True}

    with pytest.raises(CheckpointError, match="mlp_bias"):
        config_from_hf(source)
    with pytest.raises(CheckpointError, match="mlp_bias"):
        hf_config_from_model_config(llama_config(mlp_bias=True))


def test_legacy_and_v5_rope_keys():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8}
    legacy = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    current = config_from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    default = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})

    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert legacy.rope_theta == 5e5
    assert current.rope_scaling == legacy.rope_scaling
    assert current.rope_theta == 5e5
    assert default.rope_scaling is None


def test_eos_list_kept_for_saving():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8, "eos_token_id": [5, 6, 7]}
    config = config_from_hf(base)

    assert config.eos_token_id == 5
    assert hf_config_from_model_config(config)["eos_token_id"] == [5, 6, 7]


def test_source_config_entries_preserved():
    source = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8, "hidden_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
              "initializer_range": 0.01, "quantization_config": {"quant_method": "gguf"}}
    written = hf_config_from_model_config(config_from_hf(source))

    assert written["initializer_range"] == 0.01
    assert "quantization_config" not in written


# --------------------------------------------------------------------------- transformers oracle


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def toy_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens, built from GGUF-style metadata."""
    from skupy.tokenizer import Tokenizer, byte_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [byte_to_unicode()[byte] for byte in range(256)] + ["Ġt", "he", "Ġthe"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    return Tokenizer.from_gguf_metadata(metadata)



def hf_models():
    """Tiny random transformers models covering each architecture variant skupy maps."""
    transformers = pytest.importorskip("transformers")
    return {
        "llama_gqa": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0)),
        "llama_tied_bias_llama3": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, head_dim=16,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}, max_position_embeddings=256)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)),
        "opt_pre_norm": transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
            max_position_embeddings=40, word_embed_proj_dim=32)),
        "opt_post_norm_projected": transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
            max_position_embeddings=40, word_embed_proj_dim=16, do_layer_norm_before=False)),
        "opt_no_bias": transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
            max_position_embeddings=40, enable_bias=False)),
    }


def trained_state(model) -> dict:
    """Give every parameter distinct random values, so a swapped or misplaced tensor is caught."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


MODEL_CASES = ["llama_gqa", "llama_tied_bias_llama3", "gpt2", "opt_pre_norm", "opt_post_norm_projected", "opt_no_bias"]


@pytest.mark.oracle
@pytest.mark.parametrize("case", MODEL_CASES)
def test_transformers_round_trip_exact(tmp_path, case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = hf_models()[case]
    original = trained_state(model)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)

    config, params = load_hf(tmp_path / "hf")
    save_hf(tmp_path / "skupy", config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "skupy")

    # skupy -> HF names gives back exactly what transformers saved.
    saved = safetensors_numpy.load_file(tmp_path / "hf" / "model.safetensors")
    ours = to_hf_state_dict(config, params)
    assert set(ours) == set(saved)
    for name in saved:
        np.testing.assert_array_equal(ours[name], saved[name], err_msg=name)

    # transformers loads skupy's folder with every tensor, tied ones included, unchanged.
    state = reloaded.state_dict()
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    assert type(reloaded).__name__ == type(model).__name__
    original_config, reloaded_config = model.config.to_dict(), reloaded.config.to_dict()
    for key in ("vocab_size", "num_hidden_layers", "tie_word_embeddings", "rope_parameters", "rms_norm_eps",
                "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "activation_function",
                "layer_norm_epsilon", "do_layer_norm_before", "_remove_final_layer_norm", "word_embed_proj_dim",
                "enable_bias", "ffn_dim", "max_position_embeddings", "n_positions"):
        if original_config.get(key) is not None:
            assert reloaded_config.get(key) == original_config[key], key


@pytest.mark.oracle
def test_transformers_config_fields_map():
    pytest.importorskip("transformers")
    models = hf_models()

    llama = config_from_hf(models["llama_tied_bias_llama3"].config.to_dict())
    opt_post = config_from_hf(models["opt_post_norm_projected"].config.to_dict())
    gpt2 = config_from_hf(models["gpt2"].config.to_dict())

    assert llama.rope_scaling["rope_type"] == "llama3"
    assert llama.rope_scaling["factor"] == 8.0
    assert llama.head_dim == 16
    assert llama.attention_bias and llama.attention_out_bias
    assert llama.tie_word_embeddings is True
    assert opt_post.pre_norm is False
    assert opt_post.final_norm is False
    assert opt_post.word_embed_proj_dim == 16
    assert opt_post.position_offset == 2
    assert gpt2.activation == "gelu_tanh"
    assert gpt2.intermediate_size == 4 * 32


@pytest.mark.oracle
def test_transformers_loads_saved_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from skupy.tokenizer import Tokenizer

    tokenizer = toy_tokenizer()
    config = llama_config(vocab_size=tokenizer.vocab_size)
    save_hf(tmp_path / "model", config, random_params(config), tokenizer=tokenizer)

    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    ours = Tokenizer.load(tmp_path / "model")
    messages = [{"role": "user", "content": "hello there"}]

    for text in ("hello the world", "<|im_start|>user\nhi<|im_end|>", "  spaces\n\nand lines"):
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)
    assert theirs.eos_token == ours.eos_token
    assert theirs.bos_token == ours.bos_token
