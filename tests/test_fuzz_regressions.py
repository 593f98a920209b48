"""Minimized inputs that once made skupy crash, hang or raise the wrong error, found by fuzzing.

Every test rebuilds its input in tmp_path and checks that the loader or binding
now raises its documented error type, or returns, quickly. Each docstring starts
with the harness in tools/fuzz_*.py that covers the input. A few more tests check that
forged sizes and offsets in checkpoint headers fail fast and without large
allocations.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from skupy import _core
from skupy.checkpoint import CheckpointError
from skupy.config import ModelConfig
from skupy.data import DataError, load_pku_saferlhf, load_truthfulqa
from skupy.hf_io import load_hf, save_hf
from skupy.layout import param_specs
from skupy.sku_config import SKUConfig

# Seconds within which a rejected input must fail; the hangs found took minutes or never ended.
FAST_SECONDS = 5.0

TRUTHFULQA_HEADER = "Question,Best Answer,Correct Answers,Incorrect Answers\n"
PKU_RECORD = {"prompt": "p", "response_0": "a", "response_1": "b",
              "is_response_0_safe": False, "is_response_1_safe": True}


TINY_LLAMA = ModelConfig(arch="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=8, max_position_embeddings=16)

GGUF_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_BLOCK_NAMES = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                    "o_proj": "attn_output", "mlp_norm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                    "down_proj": "ffn_down"}


def tiny_params(config: ModelConfig = TINY_LLAMA) -> dict:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in param_specs(config, include_lora=False)}


def write_tiny_gguf(path, block_count: int = TINY_LLAMA.num_layers, eos_token_id=None) -> None:
    """Write the tensors of TINY_LLAMA (one layer) with block_count and eos_token_id in the metadata.

    eos_token_id may be any value gguf.GGUFWriter.add_key_value infers a type for,
    such as a list, which a real file never contains there.
    """
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    if eos_token_id is not None:
        value_type = gguf.GGUFValueType.ARRAY if isinstance(eos_token_id, list) else gguf.GGUFValueType.STRING
        writer.add_key_value("tokenizer.ggml.eos_token_id", eos_token_id, value_type)
    writer.add_block_count(block_count)
    writer.add_context_length(TINY_LLAMA.max_position_embeddings)
    writer.add_embedding_length(TINY_LLAMA.hidden_size)
    writer.add_feed_forward_length(TINY_LLAMA.intermediate_size)
    writer.add_head_count(TINY_LLAMA.num_heads)
    writer.add_head_count_kv(TINY_LLAMA.num_kv_heads)
    writer.add_vocab_size(TINY_LLAMA.vocab_size)
    for name, value in tiny_params().items():
        if name in GGUF_NAMES:
            writer.add_tensor(GGUF_NAMES[name], value)
        else:
            _layers, layer, kind, suffix = name.split(".")
            writer.add_tensor(f"blk.{layer}.{GGUF_BLOCK_NAMES[kind]}.{suffix}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("block_count", [2**32 - 1, 10**6])
def test_gguf_huge_block_count_fails_fast(tmp_path, block_count):
    """fuzz_gguf: block_count 2**32-1 made load_gguf list 2**32 layers of parameter names (a hang)."""
    from skupy.gguf_io import load_gguf

    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, block_count)

    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="block_count") as raised:
        load_gguf(path)
    assert time.perf_counter() - start < FAST_SECONDS
    assert str(path) in str(raised.value)


def test_gguf_tiny_file_loads(tmp_path):
    """The file the block_count test starts from is valid with the true block count."""
    from skupy.gguf_io import load_gguf

    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, TINY_LLAMA.num_layers)

    config, params, _metadata = load_gguf(path)
    assert config.num_layers == 1
    assert list(params) == [name for name, _shape in param_specs(config, include_lora=False)]


@pytest.mark.parametrize("eos_token_id", [[1, 2], "2"], ids=["list", "string"])
def test_gguf_token_id_wrong_type(tmp_path, eos_token_id):
    """fuzz_gguf: an eos token id stored as an array raised TypeError from int()."""
    from skupy.gguf_io import load_gguf

    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, eos_token_id=eos_token_id)

    with pytest.raises(CheckpointError, match="eos_token_id") as raised:
        load_gguf(path)
    assert str(path) in str(raised.value)


def test_hf_deeply_nested_config(tmp_path):
    """fuzz_hf: config.json nested 100000 levels deep raised RecursionError from json.loads."""
    folder = save_hf(tmp_path / "model", TINY_LLAMA, tiny_params())
    (folder / "config.json").write_text('{"architectures": ' + "[" * 100000 + "]" * 100000 + "}")

    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_hf(folder)


def test_hf_config_with_huge_integer(tmp_path):
    """A 5000-digit integer in config.json made json.loads raise a plain ValueError past the int digit limit."""
    folder = save_hf(tmp_path / "model", TINY_LLAMA, tiny_params())
    (folder / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")

    with pytest.raises(CheckpointError, match="invalid config.json"):
        load_hf(folder)


@pytest.mark.parametrize("changes", [
    {"architectures": 5},
    {"architectures": [], "model_type": ["llama"]},
    {"architectures": [{"name": "LlamaForCausalLM"}]},
    {"rope_theta": 10**400},
    {"rope_parameters": {"rope_type": "default", "rope_theta": "fast"}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": [1]}},
], ids=["architectures-int", "model_type-list", "architectures-dict", "rope_theta-huge", "rope_theta-string",
        "rope_theta-list"])
def test_hf_config_entry_wrong_type(tmp_path, changes):
    """fuzz_hf: config.json entries of the wrong type raised TypeError, ValueError or OverflowError."""
    folder = save_hf(tmp_path / "model", TINY_LLAMA, tiny_params())
    config_path = folder / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json.update(changes)
    config_path.write_text(json.dumps(config_json))

    with pytest.raises(CheckpointError) as raised:
        load_hf(folder)
    assert str(config_path) in str(raised.value)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_hf_activation_wrong_type(tmp_path, model_type):
    """fuzz_hf: a list as GPT-2's or OPT's activation_function raised TypeError (unhashable list)."""
    folder = tmp_path / model_type
    folder.mkdir()
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({"model_type": model_type, "activation_function": ["relu"]}))

    with pytest.raises(CheckpointError, match="activation_function") as raised:
        load_hf(folder)
    assert str(config_path) in str(raised.value)


@pytest.mark.parametrize("shard", [{"file": "model.safetensors"}, ["model.safetensors"], 3])
def test_hf_index_non_string_shard(tmp_path, shard):
    """fuzz_hf: a dict as a weight_map value raised TypeError (unhashable) in the shard list."""
    folder = save_hf(tmp_path / "model", TINY_LLAMA, tiny_params())
    (folder / "model.safetensors").rename(folder / "model-1.safetensors")
    index_path = folder / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))

    with pytest.raises(CheckpointError, match="shard file names") as raised:
        load_hf(folder)
    assert str(index_path) in str(raised.value)


@pytest.mark.parametrize("num_layers", [10**12, 10**6])
def test_hf_huge_layer_count_fails_fast(tmp_path, num_layers):
    """fuzz_hf: num_hidden_layers 10**12 in config.json made load_hf list 10**12 layers (a hang)."""
    folder = save_hf(tmp_path / "model", TINY_LLAMA, tiny_params())
    config_path = folder / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["num_hidden_layers"] = num_layers
    config_path.write_text(json.dumps(config_json))

    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers|layers") as raised:
        load_hf(folder)
    assert time.perf_counter() - start < FAST_SECONDS
    assert str(folder) in str(raised.value)


@pytest.mark.parametrize("num_heads", [0, -2])
def test_model_config_zero_heads(num_heads):
    """fuzz_gguf: a GPT-2 GGUF with head_count 0 raised ZeroDivisionError while computing head_dim."""
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(arch="gpt2", hidden_size=8, num_heads=num_heads)


def test_hf_gpt2_zero_heads(tmp_path):
    """fuzz_gguf: the same ZeroDivisionError was reachable from config.json through n_head 0."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8, "n_embd": 8, "n_layer": 1,
                                                    "n_head": 0, "n_positions": 8}))

    with pytest.raises(CheckpointError, match="num_heads"):
        load_hf(folder)


def gguf_tensor_offset_position(path, tensor_name: str) -> int:
    """Byte position of the data offset (u64) in the tensor info of tensor_name."""
    gguf = pytest.importorskip("gguf")
    tensor = next(item for item in gguf.GGUFReader(str(path)).tensors if item.name == tensor_name)
    # name length (u64), name, dimension count (u32), dimensions (u64 each), type (u32), then the offset
    return tensor.field.offset + 8 + len(tensor_name.encode()) + 4 + 8 * len(tensor.shape) + 4


@pytest.mark.parametrize("offset", [2**40, 2**64 - 32])
def test_gguf_tensor_offset_past_end(tmp_path, offset):
    """A tensor whose data offset points past the end of the file is an error, not a short read."""
    from skupy.gguf_io import load_gguf

    path = tmp_path / "model.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    position = gguf_tensor_offset_position(path, "token_embd.weight")
    data[position:position + 8] = offset.to_bytes(8, "little")
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError) as raised:
        load_gguf(path)
    assert str(path) in str(raised.value)


# The child process loads each hostile file under an address-space limit and prints the
# exception type, so an allocation sized from a forged header fails there with MemoryError.
BOUNDED_LOADER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]) * 2**20,) * 2)
from skupy.gguf_io import load_gguf
from skupy.hf_io import load_hf
for path in sys.argv[2:]:
    try:
        (load_hf if path.endswith("hf") else load_gguf)(path)
        print("loaded")
    except BaseException as error:
        print(type(error).__name__)
"""
# NOTE: an estimate: importing numpy, gguf and skupy takes well under 1 GiB of address space.
MEMORY_LIMIT_MB = 2048


def forge_u64(path, position: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[position:position + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of shadow memory, so it cannot run under "
                           "the 2 GiB address-space limit this test sets")
def test_huge_headers_load_in_bounded_memory(tmp_path):
    """Headers that claim huge counts, tensors or layer counts fail without allocating for them."""
    gguf = pytest.importorskip("gguf")
    tensor_count = tmp_path / "tensor_count.gguf"
    write_tiny_gguf(tensor_count)
    forge_u64(tensor_count, 8, 2**40)  # the u64 after the magic and the version

    dims = tmp_path / "dims.gguf"
    write_tiny_gguf(dims)
    tensor = next(item for item in gguf.GGUFReader(str(dims)).tensors if item.name == "token_embd.weight")
    # name length (u64), name, dimension count (u32), then the first dimension
    forge_u64(dims, tensor.field.offset + 8 + len(b"token_embd.weight") + 4, 2**34)

    layers = tmp_path / "layers.gguf"
    write_tiny_gguf(layers, block_count=2**32 - 1)

    shape_folder = save_hf(tmp_path / "shape_hf", TINY_LLAMA, tiny_params())
    weights = shape_folder / "model.safetensors"
    raw = weights.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_size])
    header["model.norm.weight"]["shape"] = [2**20, 2**20]
    encoded = json.dumps(header).encode()
    weights.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + header_size:])

    layers_folder = save_hf(tmp_path / "layers_hf", TINY_LLAMA, tiny_params())
    config_json = json.loads((layers_folder / "config.json").read_text())
    config_json["num_hidden_layers"] = 10**12
    (layers_folder / "config.json").write_text(json.dumps(config_json))

    paths = [str(path) for path in (tensor_count, dims, layers, shape_folder, layers_folder)]
    completed = subprocess.run([sys.executable, "-c", BOUNDED_LOADER, str(MEMORY_LIMIT_MB), *paths],
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert dict(zip(paths, completed.stdout.split())) == {path: "CheckpointError" for path in paths}


# --------------------------------------------------------------------------- PKU-SafeRLHF


@pytest.mark.parametrize("content, match", [
    (b"\x00\x8b" + b"\xff" * 40, "gzip"),
    (gzip.compress(json.dumps(PKU_RECORD).encode())[:-12], "gzip"),
    (gzip.compress(b"\xff\xfe not text\n"), "UTF-8"),
], ids=["not-gzip", "truncated-gzip", "gzip-of-invalid-utf8"])
def test_pku_broken_gzip(tmp_path, content, match):
    """fuzz_pku: gzip.BadGzipFile, EOFError and a bare UnicodeDecodeError escaped load_pku_saferlhf."""
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(content)

    with pytest.raises(DataError, match=match) as raised:
        load_pku_saferlhf(path)
    assert str(path) in str(raised.value)


def test_pku_deeply_nested_line(tmp_path):
    """fuzz_pku: a line of 100000 "[" raised RecursionError from json.loads."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(PKU_RECORD) + "\n" + "[" * 100000 + "\n")

    with pytest.raises(DataError, match="line 2"):
        load_pku_saferlhf(path)


def test_pku_invalid_utf8_names_file(tmp_path):
    """fuzz_pku: invalid UTF-8 raised a UnicodeDecodeError that did not name the file."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(PKU_RECORD).encode() + b"\n\xff\n")

    with pytest.raises(DataError, match="UTF-8") as raised:
        load_pku_saferlhf(path)
    assert str(path) in str(raised.value)


# --------------------------------------------------------------------------- TruthfulQA


def test_truthfulqa_huge_cell(tmp_path):
    """fuzz_truthfulqa: a cell over the csv module's 131072-character field limit raised _csv.Error."""
    path = tmp_path / "TruthfulQA.csv"
    path.write_text(TRUTHFULQA_HEADER + "q," + "a" * 200000 + ",c,d\n")

    with pytest.raises(DataError, match="line") as raised:
        load_truthfulqa(path)
    assert str(path) in str(raised.value)


def test_truthfulqa_invalid_utf8(tmp_path):
    """fuzz_truthfulqa: invalid UTF-8 raised a UnicodeDecodeError that did not name the file."""
    path = tmp_path / "TruthfulQA.csv"
    path.write_bytes(TRUTHFULQA_HEADER.encode() + b"q,\xff,c,d\n")

    with pytest.raises(DataError, match="UTF-8") as raised:
        load_truthfulqa(path)
    assert str(path) in str(raised.value)


# --------------------------------------------------------------------------- SKU config files


@pytest.mark.parametrize("name, text", [
    ("config.yaml", "lr: [\n"),
    ("config.yaml", "[1]: 2\n"),
    ("config.yaml", "model: !!python/object/apply:os.system ['true']\n"),
    ("config.json", "[" * 100000),
    ("config.yaml", "preset: [1]\n"),
    ("config.yaml", "preset: {a: 1}\n"),
], ids=["yaml-syntax", "yaml-list-key", "yaml-python-tag", "json-deep", "preset-list", "preset-mapping"])
def test_sku_config_invalid_file(tmp_path, name, text):
    """fuzz_sku_config: YAML parse errors, RecursionError and TypeError escaped SKUConfig.from_file."""
    path = tmp_path / name
    path.write_text(text)

    with pytest.raises(ValueError) as raised:
        SKUConfig.from_file(path)
    assert str(path) in str(raised.value)


def test_sku_config_alias_bomb_fails_fast(tmp_path):
    """fuzz_sku_config: YAML aliases that expand to 10**8 strings made the error message take minutes.

    The error message printed the whole value with repr, which walks every
    alias again; a handful of anchors is enough to make that exponential.
    """
    lines = ["lr:", "  - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")

    start = time.perf_counter()
    with pytest.raises(ValueError, match="lr must be a number"):
        SKUConfig.from_file(path)
    assert time.perf_counter() - start < FAST_SECONDS


# --------------------------------------------------------------------------- C engine


ENGINE_CONFIG = dict(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                     intermediate_size=8, max_position_embeddings=16, norm="rmsnorm", activation="swiglu",
                     position="rope")


@pytest.mark.parametrize("changes", [
    # 7 + 32 * 2**30 slots wrapped around to 7 in int, and param_specs wrote past a 7-entry buffer.
    {"num_layers": 2**30},
    # num_heads * head_dim = 2**32 wrapped to 0, so q_proj.weight had 0 rows.
    {"num_heads": 2**16, "num_kv_heads": 2**16, "head_dim": 2**16},
    {"num_heads": 2**10, "num_kv_heads": 1, "head_dim": 2**21},
    # max_position_embeddings + position_offset wrapped to a negative row count.
    {"position": "learned", "max_position_embeddings": 2**30, "position_offset": 2**30},
])
def test_engine_int_overflow_sizes(changes):
    """fuzz_engine: Engine configs whose sizes overflow int wrote past a heap buffer (seen under ASan)."""
    config = dict(ENGINE_CONFIG, **changes)

    with pytest.raises(ValueError, match="too large"):
        _core.Engine(config)


def test_engine_thousand_layers_accepted():
    """The overflow check must accept a deep model whose sizes fit in an int."""
    engine = _core.Engine(dict(ENGINE_CONFIG, num_layers=1000))

    assert len(engine.param_specs()) == 3 + 1000 * 9
    assert np.all([len(shape) in (1, 2) for _name, shape in engine.param_specs()])


@pytest.mark.parametrize("call", [
    lambda: _core.sum_squares(np.arange(6, dtype=">f4")),
    lambda: _core.embedding_forward(np.array([1, 0], dtype=">i4"), np.ones((4, 2), np.float32)),
    lambda: _core.axpby(np.zeros(3, ">f4"), np.ones(3, np.float32), np.ones(3, np.float32), 1.0, 1.0),
    lambda: _core.linear_backward(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32),
                                  np.ones((3, 4), np.float32), dinp=np.zeros((2, 4), ">f4")),
], ids=["sum_squares", "embedding_forward", "axpby", "linear_backward"])
def test_ops_non_native_byte_order(call):
    """fuzz_ops: a big-endian ">f4" array passed the dtype check, and ops read or wrote its bytes as native floats."""
    with pytest.raises(TypeError, match="byte order"):
        call()


@pytest.mark.parametrize("count", [0, 2**31 - 1, 100000])
def test_set_num_threads_out_of_range(count):
    """fuzz_ops: set_num_threads(2**31 - 1) was accepted, and the next parallel loop aborted in libgomp."""
    before = _core.get_num_threads()

    with pytest.raises(ValueError, match="num_threads"):
        _core.set_num_threads(count)
    assert _core.get_num_threads() == before


@pytest.mark.parametrize("alias", ["lora_A", "lora_B", "lora_A view"])
def test_lora_merge_aliased_weight(alias):
    """fuzz_ops: lora_merge accepted lora_A that was the weight itself and read it while sgemm wrote it."""
    weight = np.ones((4, 4), np.float32)
    lora_a, lora_b = np.ones((4, 4), np.float32), np.ones((4, 4), np.float32)
    if alias == "lora_A":
        lora_a = weight
    elif alias == "lora_B":
        lora_b = weight
    else:
        lora_a = weight.reshape(-1)[:8].reshape(2, 4)
        lora_b = np.ones((4, 2), np.float32)
    before = weight.copy()

    with pytest.raises(ValueError, match="shares memory"):
        _core.lora_merge(weight, lora_a, lora_b, 0.5)
    np.testing.assert_array_equal(weight, before)
