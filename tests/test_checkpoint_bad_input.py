"""Broken, truncated, hostile and unsupported checkpoints: each must raise a clear error.

Every test builds its broken file in tmp_path. The checks are that the exception type
is CheckpointError (a ValueError) or CheckpointNotFoundError (a FileNotFoundError), that
the message names the file and the problem, and that nothing huge is allocated.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from skupy.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    resolve_checkpoint,
)
from skupy.config import ModelConfig  # noqa: E402
from skupy.gguf_io import find_packaged_gguf, load_gguf, permute_rotary_rows  # noqa: E402
from skupy.hf_io import load_hf, save_hf  # noqa: E402
from skupy.layout import param_specs  # noqa: E402
from skupy.tokenizer import Tokenizer, byte_to_unicode  # noqa: E402

# Seconds a rejected file may take; a reader that loops over a forged array length takes far longer.
FAST_REJECTION_SECONDS = 5.0

CONFIG = ModelConfig(arch="llama", vocab_size=259, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

GGUF_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_BLOCK = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "mlp_norm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
              "down_proj": "ffn_down"}


def random_params(config: ModelConfig = CONFIG) -> dict:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in param_specs(config)}


def write_tiny_gguf(path, embedding_length: int = CONFIG.hidden_size):
    """Write a valid one-layer LLaMA GGUF with a byte-level vocabulary; embedding_length can lie."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(CONFIG.num_layers)
    writer.add_context_length(CONFIG.max_position_embeddings)
    writer.add_embedding_length(embedding_length)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [byte_to_unicode()[byte] for byte in range(256)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * 256)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    for name, value in random_params().items():
        match = re.match(r"layers\.(\d+)\.(\w+)\.weight$", name)
        if match is None:
            writer.add_tensor(GGUF_NAMES[name], value)
            continue
        if match[2] == "q_proj":
            value = permute_rotary_rows(value, CONFIG.num_heads)
        if match[2] == "k_proj":
            value = permute_rotary_rows(value, CONFIG.num_kv_heads)
        writer.add_tensor(f"blk.{match[1]}.{GGUF_BLOCK[match[2]]}.weight", value)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch_bytes(path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def array_length_offset(path, key: str) -> int:
    """Byte offset of the element count of GGUF array field key."""
    field = gguf.GGUFReader(str(path)).fields[key]
    # key length (u64), key bytes, value type (u32), element type (u32), then the count (u64)
    return field.offset + 8 + len(key.encode()) + 4 + 4


def tensor_dims_offset(path, tensor_name: str) -> int:
    """Byte offset of the first dimension (u64) in the tensor info of tensor_name."""
    reader = gguf.GGUFReader(str(path))
    tensor = next(tensor for tensor in reader.tensors if tensor.name == tensor_name)
    # name length (u64), name bytes, dimension count (u32), then the dimensions (u64 each)
    return tensor.field.offset + 8 + len(tensor_name.encode()) + 4


def assert_rejected_fast(path, match: str, loader=load_gguf, error=CheckpointError):
    start = time.perf_counter()
    with pytest.raises(error, match=match) as raised:
        loader(path)
    assert time.perf_counter() - start < FAST_REJECTION_SECONDS
    assert str(path) in str(raised.value)
    return raised.value


# --------------------------------------------------------------------------- GGUF


def test_tiny_gguf_is_valid(tmp_path):
    # The broken files below start from this one, so it must load.
    config, params, _metadata = load_gguf(write_tiny_gguf(tmp_path / "ok.gguf"))

    assert config.hidden_size == CONFIG.hidden_size
    assert len(params) == len(param_specs(CONFIG))


@pytest.mark.parametrize("fraction", [0.002, 0.05, 0.3, 0.6, 0.95])
def test_truncated_gguf(tmp_path, fraction):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:max(24, int(len(data) * fraction))])

    assert_rejected_fast(path, "invalid|truncated|past the end|file has")


def test_gguf_shorter_than_header(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF\x03\x00")

    assert_rejected_fast(path, "shorter than the 24-byte GGUF header")


def test_empty_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")

    assert_rejected_fast(path, "0 bytes")


def test_gguf_corrupted_magic(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    patch_bytes(path, 0, "4s", b"GGML")

    assert_rejected_fast(path, "starts with b'GGML' instead of b'GGUF'")


def test_gguf_unsupported_version(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    patch_bytes(path, 4, "<I", 99)

    assert_rejected_fast(path, "invalid GGUF file.*version 99")


@pytest.mark.parametrize("offset, label", [(8, "tensor_count"), (16, "kv_count")])
def test_gguf_huge_counts(tmp_path, offset, label):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    patch_bytes(path, offset, "<Q", 2**40)

    assert_rejected_fast(path, "invalid|truncated")


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
def test_gguf_huge_array_length(tmp_path, key):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    patch_bytes(path, array_length_offset(path, key), "<Q", 2**40)

    assert_rejected_fast(path, "invalid|truncated")


def test_gguf_huge_tensor_dims(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    patch_bytes(path, tensor_dims_offset(path, "token_embd.weight"), "<Q", 2**34)

    assert_rejected_fast(path, "invalid|truncated|past the end|file has")


def test_gguf_tensor_shape_disagrees_with_metadata(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", embedding_length=64)

    error = assert_rejected_fast(path, r"has shape .* but the GGUF metadata implies")
    assert "token_embd.weight" in str(error) or "blk.0" in str(error)


def test_gguf_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="GGUF file not found"):
        load_gguf(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------- safetensors


def write_hf_folder(folder, config: ModelConfig = CONFIG):
    save_hf(folder, config, random_params(config))
    return folder


def test_truncated_safetensors(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    assert_rejected_fast(weights, "invalid safetensors file", loader=lambda _path: load_hf(folder))


def test_safetensors_header_claims_more_data(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["model.norm.weight"]["shape"] = [2**20, 2**20]
    header["model.norm.weight"]["data_offsets"][1] = header["model.norm.weight"]["data_offsets"][0] + 4 * 2**40
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])

    assert_rejected_fast(weights, "invalid safetensors file", loader=lambda _path: load_hf(folder))


@pytest.mark.parametrize("header_size", [2**40, 2**63])
def test_safetensors_huge_header_size(tmp_path, header_size):
    folder = write_hf_folder(tmp_path / "hf")
    weights = folder / "model.safetensors"
    patch_bytes(weights, 0, "<Q", header_size)

    assert_rejected_fast(weights, "invalid safetensors file", loader=lambda _path: load_hf(folder))


def test_safetensors_not_safetensors(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file at all")

    assert_rejected_fast(folder / "model.safetensors", "invalid safetensors", loader=lambda _path: load_hf(folder))


def rewrite_weights(folder, change):
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_safetensors_wrong_shape_for_config(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    rewrite_weights(folder, lambda state: state.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), dtype=np.float32)}))

    error = assert_rejected_fast(folder / "model.safetensors", r"k_proj\.weight has shape \(32, 32\)",
                                 loader=lambda _path: load_hf(folder))
    assert "(16, 32)" in str(error)


def test_safetensors_missing_tensor(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    rewrite_weights(folder, lambda state: state.pop("model.layers.0.mlp.up_proj.weight"))

    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is missing"):
        load_hf(folder)


def test_safetensors_unexpected_tensor(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    rewrite_weights(folder, lambda state: state.update({"model.layers.7.extra.weight": np.zeros(2, np.float32)}))

    with pytest.raises(CheckpointError, match=r"not used by a LlamaForCausalLM.*layers\.7\.extra"):
        load_hf(folder)


def test_safetensors_integer_tensor(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    rewrite_weights(folder, lambda state: state.update(
        {"model.norm.weight": np.zeros(CONFIG.hidden_size, dtype=np.int32)}))

    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype I32"):
        load_hf(folder)


def test_missing_config_json(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "config.json").unlink()

    with pytest.raises(CheckpointNotFoundError, match="config.json is missing"):
        load_hf(folder)


def test_invalid_config_json(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text("{\"vocab_size\": 12,")

    with pytest.raises(CheckpointError, match=r"config\.json: invalid config\.json"):
        load_hf(folder)


def test_config_missing_required_entry(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        load_hf(folder)


def test_unsupported_hf_architecture(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="MistralForCausalLM.*LlamaForCausalLM, GPT2LMHeadModel, OPTForCausalLM"):
        load_hf(folder)


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_rejected_unopened(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))

    with pytest.raises(CheckpointError, match="pytorch_model.bin.*Convert the checkpoint to safetensors"):
        load_hf(folder)
    assert not marker.exists()


def test_no_weights(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()

    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        load_hf(folder)


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_index_missing_shard(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    write_index(folder, {"model.norm.weight": "model-00001-of-00002.safetensors"})

    with pytest.raises(CheckpointNotFoundError, match="shard model-00001-of-00002.safetensors is missing"):
        load_hf(folder)


def test_sharded_index_outside_folder(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    write_index(folder, {"model.norm.weight": "../outside.safetensors"})

    with pytest.raises(CheckpointError, match="invalid shard file name"):
        load_hf(folder)


# --------------------------------------------------------------------------- load_checkpoint


def test_unknown_model_name():
    with pytest.raises(CheckpointNotFoundError) as raised:
        load_checkpoint("no-such-model-anywhere")

    message = str(raised.value)
    assert "unknown model name 'no-such-model-anywhere'" in message
    assert "smollm2-135m-instruct" in message
    assert "path of a .gguf file" in message


def test_missing_path():
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_checkpoint("./absent/model.gguf")


def test_hub_id_offline_is_unknown(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(CheckpointNotFoundError, match="unknown model name 'someorg/somemodel'") as raised:
        load_checkpoint("someorg/somemodel")
    assert "HF_HUB_OFFLINE is set" in str(raised.value)


def test_packaged_names_resolve():
    try:
        packaged = find_packaged_gguf()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))

    assert resolve_checkpoint("smollm2-135m-instruct") == packaged
    assert resolve_checkpoint("SmolLM2-135M-Instruct") == packaged
    assert resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct") == packaged


def test_hf_folder_without_tokenizer(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")

    with pytest.raises(CheckpointNotFoundError, match="no tokenizer found.*tokenizer="):
        load_checkpoint(folder)


def test_hf_folder_with_tokenizer_override(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    gguf_path = write_tiny_gguf(tmp_path / "tok.gguf")

    config, params, tokenizer = load_checkpoint(folder, tokenizer=gguf_path)

    assert config.hidden_size == CONFIG.hidden_size
    assert len(params) == len(param_specs(CONFIG))
    assert tokenizer.eos_token_id == 2


def test_hf_folder_without_config(tmp_path):
    folder = write_hf_folder(tmp_path / "hf")
    (folder / "config.json").unlink()

    with pytest.raises(CheckpointNotFoundError, match="config.json is missing"):
        load_checkpoint(folder)


def test_hf_folder_with_tokenizer_loads(tmp_path):
    tokenizer = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "tok.gguf"))
    params = random_params()
    save_hf(tmp_path / "hf", CONFIG, params, tokenizer=tokenizer)

    config, loaded, loaded_tokenizer = load_checkpoint(tmp_path / "hf")

    assert config.num_kv_heads == CONFIG.num_kv_heads
    assert list(loaded) == list(params)
    assert loaded_tokenizer.encode("hi there") == tokenizer.encode("hi there")
    assert loaded_tokenizer.eos_token_id == 2


def test_gguf_path_loads(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")

    config, params, tokenizer = load_checkpoint(path)

    assert config.num_kv_heads == CONFIG.num_kv_heads
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == CONFIG.vocab_size


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")

    with pytest.raises(CheckpointError, match=r"weights\.npz: unsupported checkpoint file"):
        load_checkpoint(path)


def test_gguf_tokenizer_missing(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(CheckpointError, match="GGUF tokenizer model None is not supported"):
        Tokenizer.from_gguf(path)
