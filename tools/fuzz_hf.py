"""Fuzz skupy.hf_io.load_hf with damaged and hostile Hugging Face checkpoint folders.

Every input builds one folder from a valid tiny checkpoint (LLaMA, GPT-2 or
OPT, written by skupy.hf_io.save_hf) and changes it in one of these ways:
  config bytes     byte edits to config.json;
  config values    entries of config.json replaced by fuzzer-chosen JSON values
                   (huge or negative sizes, NaN, wrong types, deep nesting);
  weight bytes     byte edits to model.safetensors, most in its header;
  weight header    a tensor's dtype, shape or data offsets in the safetensors
                   header replaced by fuzzer-chosen values;
  shards           the weights replaced by a model.safetensors.index.json with
                   fuzzer-chosen shard names;
  pickle           only a pytorch_model.bin whose unpickling would create a
                   marker file: load_hf must reject it without unpickling.
load_hf may return or raise CheckpointError (a ValueError); any other exception,
a hang (libFuzzer -timeout) or an allocation past the address-space limit
(MemoryError) is reported. A returned model must match its own config and run
one token through skupy.model.Model.

    python tools/fuzz_hf.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import json
import pickle
import struct
import sys

import numpy as np

import fuzz_common
from fuzz_common import INTERESTING_INTS, UnexpectedBehavior, mutate_bytes, pick_float, pick_int

import atheris

with atheris.instrument_imports(include=["skupy"]):
    from skupy.checkpoint import CheckpointError
    from skupy.config import ModelConfig
    from skupy.hf_io import load_hf, save_hf
    from skupy.layout import param_specs
    from skupy.model import Model

SCRATCH = fuzz_common.scratch_dir("skupy-fuzz-hf-")
FOLDER = SCRATCH / "checkpoint"
MARKER = SCRATCH / "unpickled"

CONFIGS = (
    ModelConfig(arch="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=8, max_position_embeddings=16, norm_eps=1e-6),
    ModelConfig(arch="gpt2", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                max_position_embeddings=8, norm="layernorm", activation="gelu_tanh", position="learned",
                tie_word_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True),
    ModelConfig(arch="opt", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                max_position_embeddings=8, norm="layernorm", activation="relu", position="learned",
                position_offset=2, tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
                mlp_bias=True, word_embed_proj_dim=4),
)

# config.json keys the loaders read, on top of those each seed already has.
EXTRA_CONFIG_KEYS = ("architectures", "model_type", "rope_scaling", "rope_parameters", "rope_theta", "head_dim",
                     "num_key_value_heads", "hidden_act", "mlp_bias", "attention_bias", "n_inner", "n_ctx",
                     "scale_attn_weights", "add_cross_attention", "activation_function", "word_embed_proj_dim",
                     "do_layer_norm_before", "enable_bias", "_remove_final_layer_norm",
                     "layer_norm_elementwise_affine", "eos_token_id", "bos_token_id", "pad_token_id",
                     "tie_word_embeddings")
SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX", "")
SHARD_NAMES = ("model.safetensors", "model-1.safetensors", "../model.safetensors", "/etc/hostname", "", ".",
               "..", "sub/model.safetensors", "missing.safetensors", "model.safetensors\x00")


class _WritesMarker:
    """Pickles to a call of open(MARKER, "w"), so unpickling it leaves MARKER behind."""

    def __reduce__(self):
        return open, (str(MARKER), "w")


def build_seeds() -> list:
    """Return (config.json bytes, model.safetensors bytes, config) for each seed model."""
    seeds = []
    for index, config in enumerate(CONFIGS):
        rng = np.random.default_rng(index)
        params = {name: rng.standard_normal(shape).astype(np.float32)
                  for name, shape in param_specs(config, include_lora=False)}
        folder = SCRATCH / f"seed{index}"
        save_hf(folder, config, params)
        load_hf(folder)
        seeds.append(((folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes(), config))
    return seeds


SEEDS = build_seeds()


def fuzzed_json_value(provider: atheris.FuzzedDataProvider, depth: int = 0):
    """Return a JSON value of a fuzzer-chosen type, nested at most a few levels."""
    kind = provider.ConsumeIntInRange(0, 9)
    if kind == 0:
        return pick_int(provider, -2, 64)
    if kind == 1:
        return pick_float(provider)
    if kind == 2:
        return provider.ConsumeUnicodeNoSurrogates(10)
    if kind == 3:
        return provider.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5 and depth < 3:
        return [fuzzed_json_value(provider, depth + 1) for _ in range(provider.ConsumeIntInRange(0, 3))]
    if kind == 6 and depth < 3:
        keys = ("rope_type", "type", "factor", "rope_theta", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings", "x")
        return {provider.PickValueInList(list(keys)): fuzzed_json_value(provider, depth + 1)
                for _ in range(provider.ConsumeIntInRange(0, 3))}
    if kind == 7:
        return provider.PickValueInList(["LlamaForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM", "llama",
                                         "gpt2", "opt", "silu", "gelu_new", "relu", "linear", "default"])
    if kind == 8:
        return provider.PickValueInList(list(INTERESTING_INTS))
    return 0


def deep_json(depth: int) -> str:
    """Return a JSON array nested depth levels deep, which recursive decoders cannot parse."""
    return "[" * depth + "]" * depth


def fuzzed_config_text(provider: atheris.FuzzedDataProvider, config_bytes: bytes) -> str:
    """Return config.json text with a few entries replaced by fuzzer-chosen values."""
    values = json.loads(config_bytes)
    keys = sorted(values) + list(EXTRA_CONFIG_KEYS)
    placeholder = None
    for _ in range(provider.ConsumeIntInRange(1, 4)):
        key = provider.PickValueInList(keys)
        if provider.ConsumeProbability() < 0.15:
            values.pop(key, None)
        elif provider.ConsumeProbability() < 0.03:
            placeholder = key
            values[key] = "DEEP"
        else:
            values[key] = fuzzed_json_value(provider)
    text = json.dumps(values)
    if placeholder is not None:
        text = text.replace('"DEEP"', deep_json(provider.ConsumeIntInRange(500, 100000)), 1)
    return text


def split_safetensors(data: bytes) -> tuple:
    """Return (header dict, tensor data bytes) of a safetensors file."""
    (header_size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + header_size]), data[8 + header_size:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def fuzzed_weight_header(provider: atheris.FuzzedDataProvider, weights: bytes) -> bytes:
    """Return the safetensors file with one tensor's dtype, shape or offsets changed."""
    header, body = split_safetensors(weights)
    names = sorted(name for name in header if name != "__metadata__")
    for _ in range(provider.ConsumeIntInRange(1, 3)):
        entry = header[provider.PickValueInList(names)]
        field = provider.ConsumeIntInRange(0, 3)
        if field == 0:
            entry["dtype"] = provider.PickValueInList(list(SAFETENSORS_DTYPES))
        elif field == 1:
            entry["shape"] = [pick_int(provider, 0, 40) for _ in range(provider.ConsumeIntInRange(0, 3))]
        elif field == 2:
            entry["data_offsets"] = [pick_int(provider, 0, len(body)), pick_int(provider, 0, len(body))]
        else:
            header["__metadata__"] = {"format": fuzzed_json_value(provider)}
    if provider.ConsumeProbability() < 0.3:
        body = body[:provider.ConsumeIntInRange(0, len(body))]
    return join_safetensors(header, body)


def reset_folder() -> None:
    FOLDER.mkdir(exist_ok=True)
    for entry in FOLDER.iterdir():
        if entry.is_dir():
            for inner in entry.iterdir():
                inner.unlink()
            entry.rmdir()
        else:
            entry.unlink()
    if MARKER.exists():
        MARKER.unlink()


def write_folder(provider: atheris.FuzzedDataProvider) -> str:
    """Write the fuzzed checkpoint into FOLDER and return the name of the mode used."""
    config_bytes, weights, _config = provider.PickValueInList(SEEDS)
    mode = provider.PickValueInList(["config bytes", "config values", "weight bytes", "weight header", "shards",
                                     "pickle"])
    if mode == "config bytes":
        config_bytes = mutate_bytes(provider, config_bytes)
    elif mode == "config values":
        config_bytes = fuzzed_config_text(provider, config_bytes).encode()
    elif mode == "weight bytes":
        weights = mutate_bytes(provider, weights, focus=8 + struct.unpack("<Q", weights[:8])[0])
    elif mode == "weight header":
        weights = fuzzed_weight_header(provider, weights)
    (FOLDER / "config.json").write_bytes(config_bytes)

    if mode == "shards":
        weight_map = {}
        for name in split_safetensors(weights)[0]:
            if name != "__metadata__":
                weight_map[name] = provider.PickValueInList(list(SHARD_NAMES))
        if provider.ConsumeProbability() < 0.2:
            weight_map = fuzzed_json_value(provider)
        (FOLDER / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (FOLDER / "model-1.safetensors").write_bytes(weights)
    elif mode == "pickle":
        (FOLDER / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _WritesMarker()}))
    else:
        (FOLDER / "model.safetensors").write_bytes(weights)
    return mode


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
    reset_folder()
    mode = write_folder(provider)
    try:
        config, params = load_hf(FOLDER)
    except CheckpointError:
        loaded = False
    else:
        loaded = True
    if MARKER.exists():
        raise UnexpectedBehavior("load_hf unpickled pytorch_model.bin")
    if mode == "pickle" and loaded:
        raise UnexpectedBehavior("load_hf loaded a folder whose only weights are pickled")
    if loaded:
        check_loaded(config, params)
        run_loaded(config, params)


if __name__ == "__main__":
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
