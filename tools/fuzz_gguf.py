"""Fuzz skupy.gguf_io.load_gguf with damaged and hostile GGUF files.

Each input picks one of three ways to build a file:
  raw       the fuzzer's bytes are the file (libFuzzer mutates saved corpus files);
  mutated   a valid tiny GGUF (LLaMA, GPT-2 or quantized LLaMA) with a few byte
            edits, most of them in the header, metadata and tensor table;
  metadata  a GGUF written with gguf.GGUFWriter whose metadata values, types
            and tensor shapes come from the fuzzer.
load_gguf may return or raise CheckpointError (a ValueError); any other exception,
a hang (libFuzzer -timeout) or an allocation past the address-space limit
(MemoryError) is reported. A returned model must match its own config and run
one token through skupy.model.Model.

    python tools/fuzz_gguf.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import re
import sys

import numpy as np

import fuzz_common
from fuzz_common import UnexpectedBehavior, mutate_bytes, pick_float, pick_int

import atheris

with atheris.instrument_imports(include=["skupy", "gguf"]):
    import gguf
    from gguf import GGMLQuantizationType as QType
    from gguf.quants import quantize

    from skupy.checkpoint import CheckpointError
    from skupy.config import ModelConfig
    from skupy.gguf_io import load_gguf, permute_rotary_rows
    from skupy.layout import param_specs
    from skupy.model import Model

SCRATCH = fuzz_common.scratch_dir("skupy-fuzz-gguf-")
FILE = SCRATCH / "model.gguf"

LLAMA = ModelConfig(arch="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=8, max_position_embeddings=16)
# Q8_0 packs blocks of 32 values along the inner dimension, so every width is 32.
LLAMA_Q8 = ModelConfig(arch="llama", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                       intermediate_size=32, max_position_embeddings=16, tie_word_embeddings=True)
GPT2 = ModelConfig(arch="gpt2", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                   max_position_embeddings=8, norm="layernorm", activation="gelu_tanh", position="learned",
                   tie_word_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True)

GLOBAL_NAMES = {"embed_tokens": "token_embd", "embed_positions": "position_embd", "norm": "output_norm",
                "lm_head": "output"}
BLOCK_NAMES = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
               "o_proj": "attn_output", "mlp_norm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
               "down_proj": "ffn_down"}

# Metadata keys load_gguf reads, without the "<arch>." prefix where it has one.
ARCH_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "vocab_size",
             "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
             "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length")
GLOBAL_KEYS = ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
               "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "general.name")


def gguf_tensors(config: ModelConfig) -> dict:
    """Return random weights for config under their llama.cpp names and layouts."""
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in param_specs(config, include_lora=False)}
    tensors = {}
    for name, value in params.items():
        match = re.match(r"layers\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if match is None:
            base, suffix = name.rsplit(".", 1)
            tensors[f"{GLOBAL_NAMES[base]}.{suffix}"] = value
            continue
        layer, kind, suffix = match.groups()
        if config.arch == "gpt2" and kind in ("q_proj", "k_proj", "v_proj"):
            if kind == "q_proj":
                parts = [params[f"layers.{layer}.{part}.{suffix}"] for part in ("q_proj", "k_proj", "v_proj")]
                tensors[f"blk.{layer}.attn_qkv.{suffix}"] = np.concatenate(parts, axis=0)
            continue
        if config.arch == "llama" and kind == "q_proj":
            value = permute_rotary_rows(value, config.num_heads)
        if config.arch == "llama" and kind == "k_proj":
            value = permute_rotary_rows(value, config.num_kv_heads)
        tensors[f"blk.{layer}.{BLOCK_NAMES[kind]}.{suffix}"] = value
    return tensors


def valid_metadata(config: ModelConfig) -> dict:
    """Return the metadata llama.cpp writes for config, as key -> (GGUF value type, value)."""
    arch = config.arch
    values = {
        "block_count": (gguf.GGUFValueType.UINT32, config.num_layers),
        "context_length": (gguf.GGUFValueType.UINT32, config.max_position_embeddings),
        "embedding_length": (gguf.GGUFValueType.UINT32, config.hidden_size),
        "feed_forward_length": (gguf.GGUFValueType.UINT32, config.intermediate_size),
        "attention.head_count": (gguf.GGUFValueType.UINT32, config.num_heads),
        "vocab_size": (gguf.GGUFValueType.UINT32, config.vocab_size),
    }
    if arch == "llama":
        values["attention.head_count_kv"] = (gguf.GGUFValueType.UINT32, config.num_kv_heads)
        values["attention.layer_norm_rms_epsilon"] = (gguf.GGUFValueType.FLOAT32, 1e-5)
        values["rope.freq_base"] = (gguf.GGUFValueType.FLOAT32, 10000.0)
    else:
        values["attention.layer_norm_epsilon"] = (gguf.GGUFValueType.FLOAT32, 1e-5)
    metadata = {f"{arch}.{key}": value for key, value in values.items()}
    metadata["tokenizer.ggml.tokens"] = (gguf.GGUFValueType.ARRAY, [f"t{i}" for i in range(config.vocab_size)])
    metadata["tokenizer.ggml.eos_token_id"] = (gguf.GGUFValueType.UINT32, 0)
    return metadata


def write_gguf(path, arch: str, metadata: dict, tensors: dict, quantized=()) -> None:
    """Write a GGUF with the given metadata and tensors; tensors named in quantized are stored as Q8_0."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value_type, value) in metadata.items():
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, value_type)
    for name, value in tensors.items():
        if name in quantized:
            writer.add_tensor(name, quantize(value, QType.Q8_0), raw_dtype=QType.Q8_0)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_seeds() -> list:
    """Return the bytes of three valid GGUFs that load_gguf accepts."""
    seeds = []
    for config, quantized in ((LLAMA, False), (GPT2, False), (LLAMA_Q8, True)):
        tensors = gguf_tensors(config)
        names = [name for name, value in tensors.items() if value.ndim == 2] if quantized else ()
        write_gguf(FILE, config.arch, valid_metadata(config), tensors, quantized=names)
        seeds.append(FILE.read_bytes())
        load_gguf(FILE)
    return seeds


SEEDS = build_seeds()
SEED_CONFIGS = (LLAMA, GPT2, LLAMA_Q8)


def fuzzed_value(provider: atheris.FuzzedDataProvider):
    """Return a (GGUF value type, value) pair of a fuzzer-chosen type."""
    kind = provider.ConsumeIntInRange(0, 7)
    if kind == 0:
        return gguf.GGUFValueType.UINT32, pick_int(provider, 0, 64) % 2**32
    if kind == 1:
        return gguf.GGUFValueType.UINT64, pick_int(provider, 0, 64) % 2**64
    if kind == 2:
        return gguf.GGUFValueType.INT32, (pick_int(provider, -4, 64) + 2**31) % 2**32 - 2**31
    if kind == 3:
        return gguf.GGUFValueType.FLOAT32, pick_float(provider)
    if kind == 4:
        return gguf.GGUFValueType.STRING, provider.ConsumeUnicodeNoSurrogates(12)
    if kind == 5:
        return gguf.GGUFValueType.BOOL, provider.ConsumeBool()
    if kind == 6:
        return gguf.GGUFValueType.FLOAT64, pick_float(provider)
    count = provider.ConsumeIntInRange(0, 6)
    if provider.ConsumeBool():
        return gguf.GGUFValueType.ARRAY, [provider.ConsumeIntInRange(0, 100) for _ in range(count)]
    return gguf.GGUFValueType.ARRAY, [provider.ConsumeUnicodeNoSurrogates(4) for _ in range(count)]


def fuzzed_tensor(provider: atheris.FuzzedDataProvider, value: np.ndarray) -> np.ndarray:
    """Return value, or an array whose shape or dtype differs from what the config implies."""
    kind = provider.ConsumeIntInRange(0, 5)
    if kind == 0:
        return value[: max(1, value.shape[0] - 1)]
    if kind == 1:
        return np.concatenate([value, value[:1]])
    if kind == 2:
        return value.astype(np.float16)
    if kind == 3:
        return value.reshape(-1)
    if kind == 4:
        return value.astype(np.int32)
    return np.full(value.shape, pick_float(provider), np.float32)


def build_metadata_file(provider: atheris.FuzzedDataProvider) -> None:
    """Write a GGUF whose metadata entries and tensors are edited by the fuzzer."""
    config = provider.PickValueInList(list(SEED_CONFIGS))
    arch = config.arch if provider.ConsumeProbability() < 0.9 else provider.PickValueInList(
        ["llama", "gpt2", "falcon", "", "llama\x00"])
    metadata = valid_metadata(config)
    for _ in range(provider.ConsumeIntInRange(1, 6)):
        key = provider.PickValueInList(list(ARCH_KEYS) + list(GLOBAL_KEYS))
        if key in ARCH_KEYS:
            key = f"{config.arch}.{key}"
        if key == "general.architecture" or provider.ConsumeProbability() < 0.15:
            metadata.pop(key, None)
        else:
            metadata[key] = fuzzed_value(provider)
    tensors = gguf_tensors(config)
    names = list(tensors)
    for _ in range(provider.ConsumeIntInRange(0, 2)):
        name = provider.PickValueInList(names)
        if provider.ConsumeProbability() < 0.3:
            tensors.pop(name, None)
        elif name in tensors:
            tensors[name] = fuzzed_tensor(provider, tensors[name])
    if provider.ConsumeProbability() < 0.2:
        tensors[provider.PickValueInList(["blk.9.attn_q.weight", "rope_freqs.weight", "blk.0.extra.weight",
                                          "blk.99999999999.attn_q.weight"])] = np.zeros((2,), np.float32)
    write_gguf(FILE, arch, metadata, tensors)


def run_loaded(config, params: dict) -> None:
    """Build a Model from a loaded checkpoint and run one token through it.

    A loaded config may still be too large for the C engine, which raises
    ValueError for it; any other exception is reported.
    """
    try:
        model = Model(config, params)
    except ValueError:
        return
    logits = model.forward([[0]])
    if logits.shape != (1, 1, config.vocab_size):
        raise UnexpectedBehavior(f"logits have shape {logits.shape}, expected (1, 1, {config.vocab_size})")


def check_loaded(config, params: dict) -> None:
    """Raise UnexpectedBehavior unless params contains every parameter of config as float32 of the right shape."""
    expected = param_specs(config, include_lora=False)
    if [name for name, _ in expected] != list(params):
        raise UnexpectedBehavior(f"parameter names {list(params)[:4]}... differ from param_specs")
    for name, shape in expected:
        array = params[name]
        if array.dtype != np.float32 or array.shape != tuple(shape) or not array.flags.c_contiguous:
            raise UnexpectedBehavior(f"{name}: {array.dtype} {array.shape}, expected float32 {tuple(shape)}")


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    mode = provider.ConsumeIntInRange(0, 2)
    try:
        if mode == 0:
            FILE.write_bytes(provider.ConsumeBytes(provider.remaining_bytes()))
        elif mode == 1:
            seed = provider.PickValueInList(SEEDS)
            FILE.write_bytes(mutate_bytes(provider, seed, focus=1024))
        else:
            build_metadata_file(provider)
    except (ValueError, TypeError, OverflowError):
        return  # gguf.GGUFWriter rejected the fuzzed values, so there is no file to load.

    try:
        config, params, _metadata = load_gguf(FILE)
    except CheckpointError:
        return
    check_loaded(config, params)
    run_loaded(config, params)


if __name__ == "__main__":
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
