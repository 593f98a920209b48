"""Read and write Hugging Face checkpoint folders (config.json + safetensors weights).

Supported classes: LlamaForCausalLM (Llama 2 and 3, SmolLM2, TinyLlama), GPT2LMHeadModel
and OPTForCausalLM. Weights are mapped to skupy's names and nn.Linear layout
(skupy.layout) on load, and back to the Hugging Face names and layouts on save:

* GPT-2 stores its linear layers as Conv1D weights of shape (in, out), which are
  transposed, and stacks q, k and v in one c_attn tensor, which is split.
* OPT stores learned positions shifted by 2 and, when word_embed_proj_dim differs from
  hidden_size, project_in/project_out layers.

Only safetensors weights are read. Pickled PyTorch files (.bin, .pt) are rejected
because unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import os
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .atomic import atomic_folder
from .checkpoint import CheckpointError, CheckpointNotFoundError
from .config import ModelConfig
from .layout import is_lora_name, param_specs

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM")
# skupy's arch names equal the HF model_type of these classes.
HF_CLASS_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM"}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# config.json and index files are small; a larger one is corrupt or not a config.
MAX_JSON_BYTES = 64 * 1024 * 1024

# HF tensors that are buffers, not parameters: GPT-2's causal masks and old LLaMA rotary tables.
_IGNORED_HF_TENSORS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")

# config.json keys that save_hf never copies from the source config: the ones it writes
# itself, and ones that would make transformers misread the saved float32 weights.
_DROPPED_CONFIG_KEYS = {
    "architectures", "model_type", "auto_map", "quantization_config", "_name_or_path",
    "transformers_version", "dtype", "torch_dtype", "rope_parameters", "rope_scaling", "rope_theta",
}


# --------------------------------------------------------------------------- JSON


def read_json(path: Union[str, os.PathLike], description: str = "JSON file") -> dict:
    """Read a JSON object from path, raising CheckpointError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{description} not found: {path}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {description} is {size} bytes, more than the {MAX_JSON_BYTES}-byte limit")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError, or an int of over 4300 digits
        raise CheckpointError(f"{path}: invalid {description}: {error}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid {description}: nested too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: invalid {description}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_text(value: dict) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- config mapping


def config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict.

    The whole source dict is kept in extra["hf_config"] so that save_hf can write back
    the entries skupy does not use. Raises CheckpointError for unsupported architectures
    and for settings skupy cannot run (for example a non-SiLU LLaMA activation).
    """
    architecture = hf_architecture(hf_config, source)
    if architecture == "LlamaForCausalLM":
        fields = _llama_fields(hf_config, source)
    elif architecture == "GPT2LMHeadModel":
        fields = _gpt2_fields(hf_config, source)
    else:
        fields = _opt_fields(hf_config, source)

    eos = hf_config.get("eos_token_id")
    extra = {"hf_config": hf_config}
    if isinstance(eos, list):
        # NOTE: ModelConfig stores one eos id. The full list (Llama 3 instruct has several)
        # goes to extra for save_hf and for generation code that stops on any of them.
        extra["eos_token_ids"] = [token for token in eos if _optional_token_id(token) is not None]
        eos = eos[0] if eos else None
    fields.update(
        bos_token_id=_optional_token_id(hf_config.get("bos_token_id")),
        eos_token_id=_optional_token_id(eos),
        pad_token_id=_optional_token_id(hf_config.get("pad_token_id")),
        extra=extra,
    )
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{source}: config.json describes an invalid model: {error}") from None


def hf_architecture(hf_config: dict, source: str = "config.json") -> str:
    """Return the supported HF class name that hf_config describes, or raise CheckpointError."""
    architectures = hf_config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list):
        raise CheckpointError(f"{source}: config entry 'architectures' must be a list of class names, "
                              f"got {architectures!r}")
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    model_type = hf_config.get("model_type")
    if not architectures and isinstance(model_type, str) and model_type in HF_CLASS_BY_MODEL_TYPE:
        return HF_CLASS_BY_MODEL_TYPE[model_type]
    found = ", ".join(map(str, architectures)) if architectures else f"model_type {model_type!r}"
    raise CheckpointError(
        f"{source}: unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _optional_token_id(value):
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _int_field(hf_config: dict, key: str, source: str, default=None) -> int:
    value = hf_config.get(key)
    if value is None:
        value = default
    if value is None:
        raise CheckpointError(f"{source}: required config entry {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: config entry {key!r} must be an integer, got {value!r}")
    return value


def _float_field(hf_config: dict, key: str, source: str, default: float) -> float:
    value = hf_config.get(key)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: config entry {key!r} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise CheckpointError(f"{source}: config entry {key!r} is too large for a float") from None


def _rope_fields(hf_config: dict, source: str) -> tuple:
    """Return (rope_theta, rope_scaling) from transformers 5's rope_parameters or the older keys.

    rope_scaling is None for the default rotary embedding, else a dict with "rope_type".
    """
    parameters = hf_config.get("rope_parameters")
    if isinstance(parameters, dict) and "rope_type" in parameters:
        theta = _float_field(parameters, "rope_theta", source, _float_field(hf_config, "rope_theta", source, 10000.0))
        scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    else:
        theta = _float_field(hf_config, "rope_theta", source, 10000.0)
        scaling = hf_config.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"{source}: config entry 'rope_scaling' must be an object, got {scaling!r}")
        scaling = dict(scaling) if scaling else None
    if scaling is not None:
        # Older configs spell the key "type".
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
        scaling.pop("type", None)
        if rope_type in (None, "default"):
            return theta, None
        scaling = {"rope_type": rope_type, **scaling}
    return theta, scaling


def _llama_fields(hf_config: dict, source: str) -> dict:
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise CheckpointError(f"{source}: LLaMA hidden_act {activation!r} is not supported; skupy runs SwiGLU with silu")
    hidden_size = _int_field(hf_config, "hidden_size", source)
    num_heads = _int_field(hf_config, "num_attention_heads", source)
    if num_heads <= 0:
        raise CheckpointError(f"{source}: num_attention_heads must be positive, got {num_heads}")
    if hf_config.get("mlp_bias", False):
        # NOTE: LlamaConfig.mlp_bias adds a bias to gate_proj too, and skupy.layout gives
        # gate_proj no bias, so these models cannot be represented yet.
        raise CheckpointError(f"{source}: LLaMA with mlp_bias=true is not supported (skupy has no gate_proj bias)")
    rope_theta, rope_scaling = _rope_fields(hf_config, source)
    attention_bias = bool(hf_config.get("attention_bias", False))
    return dict(
        arch="llama",
        vocab_size=_int_field(hf_config, "vocab_size", source),
        hidden_size=hidden_size,
        num_layers=_int_field(hf_config, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=_int_field(hf_config, "num_key_value_heads", source, default=num_heads),
        head_dim=_int_field(hf_config, "head_dim", source, default=hidden_size // num_heads),
        intermediate_size=_int_field(hf_config, "intermediate_size", source),
        max_position_embeddings=_int_field(hf_config, "max_position_embeddings", source, default=2048),
        norm="rmsnorm",
        norm_eps=_float_field(hf_config, "rms_norm_eps", source, 1e-6),
        activation="swiglu",
        position="rope",
        rope_theta=rope_theta,
        rope_interleaved=False,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        # LlamaConfig.attention_bias puts a bias on q, k, v and o_proj alike.
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,
        mlp_bias=False,
    )


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu"}


def _gpt2_fields(hf_config: dict, source: str) -> dict:
    activation = hf_config.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in _GPT2_ACTIVATIONS:
        raise CheckpointError(f"{source}: GPT-2 activation_function {activation!r} is not supported; "
                              f"supported: {', '.join(_GPT2_ACTIVATIONS)}")
    for key, required in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
        if bool(hf_config.get(key, required)) != required:
            raise CheckpointError(f"{source}: GPT-2 with {key}={hf_config[key]!r} is not supported")
    hidden_size = _int_field(hf_config, "n_embd", source)
    return dict(
        arch="gpt2",
        vocab_size=_int_field(hf_config, "vocab_size", source),
        hidden_size=hidden_size,
        num_layers=_int_field(hf_config, "n_layer", source),
        num_heads=_int_field(hf_config, "n_head", source),
        intermediate_size=_int_field(hf_config, "n_inner", source, default=4 * hidden_size),
        max_position_embeddings=_int_field(hf_config, "n_positions", source, default=hf_config.get("n_ctx", 1024)),
        norm="layernorm",
        norm_eps=_float_field(hf_config, "layer_norm_epsilon", source, 1e-5),
        activation=_GPT2_ACTIVATIONS[activation],
        position="learned",
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
    )


_OPT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# OPT's learned position table has 2 extra rows before position 0.
OPT_POSITION_OFFSET = 2


def _opt_fields(hf_config: dict, source: str) -> dict:
    activation = hf_config.get("activation_function", "relu")
    if not isinstance(activation, str) or activation not in _OPT_ACTIVATIONS:
        raise CheckpointError(f"{source}: OPT activation_function {activation!r} is not supported; "
                              f"supported: {', '.join(_OPT_ACTIVATIONS)}")
    if not hf_config.get("layer_norm_elementwise_affine", True):
        raise CheckpointError(f"{source}: OPT with layer_norm_elementwise_affine=false is not supported")
    hidden_size = _int_field(hf_config, "hidden_size", source)
    embed_dim = _int_field(hf_config, "word_embed_proj_dim", source, default=hidden_size)
    pre_norm = bool(hf_config.get("do_layer_norm_before", True))
    enable_bias = bool(hf_config.get("enable_bias", True))
    return dict(
        arch="opt",
        vocab_size=_int_field(hf_config, "vocab_size", source),
        hidden_size=hidden_size,
        num_layers=_int_field(hf_config, "num_hidden_layers", source),
        num_heads=_int_field(hf_config, "num_attention_heads", source),
        intermediate_size=_int_field(hf_config, "ffn_dim", source),
        max_position_embeddings=_int_field(hf_config, "max_position_embeddings", source),
        norm="layernorm",
        norm_eps=1e-5,  # OPT builds nn.LayerNorm with its default eps
        activation=_OPT_ACTIVATIONS[activation],
        position="learned",
        position_offset=OPT_POSITION_OFFSET,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        attention_bias=enable_bias,
        attention_out_bias=enable_bias,
        mlp_bias=enable_bias,
        pre_norm=pre_norm,
        # OPTDecoder creates its final LayerNorm only for pre-norm models.
        final_norm=pre_norm and not hf_config.get("_remove_final_layer_norm", False),
        word_embed_proj_dim=embed_dim if embed_dim != hidden_size else None,
    )


def hf_config_from_model_config(config: ModelConfig) -> dict:
    """Return the config.json dict of the HF class for config.arch.

    Entries of the source config kept in config.extra["hf_config"] are copied when the
    source had the same model_type, except those in _DROPPED_CONFIG_KEYS. Raises
    CheckpointError when the HF class cannot express config.
    """
    _check_hf_compatible(config)
    architecture = HF_CLASS_BY_MODEL_TYPE[config.arch]
    model_type = config.arch
    source = config.extra.get("hf_config") if isinstance(config.extra, dict) else None
    result = {}
    if isinstance(source, dict) and source.get("model_type") == model_type:
        result = {key: value for key, value in source.items() if key not in _DROPPED_CONFIG_KEYS}

    result.update(architectures=[architecture], model_type=model_type, vocab_size=config.vocab_size,
                  tie_word_embeddings=config.tie_word_embeddings,
                  # transformers 4 reads torch_dtype, transformers 5 reads dtype.
                  torch_dtype="float32", dtype="float32")
    if config.arch == "llama":
        result.update(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act="silu",
            max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
            # transformers 5 converts these older keys into rope_parameters; transformers 4 reads them directly.
            rope_theta=config.rope_theta, rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
            attention_bias=config.attention_bias, mlp_bias=False,
        )
    elif config.arch == "gpt2":
        result.update(
            n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
            n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
            layer_norm_epsilon=config.norm_eps,
            activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.activation],
        )
    else:
        result.update(
            hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, ffn_dim=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings, word_embed_proj_dim=config.embed_dim,
            do_layer_norm_before=config.pre_norm,
            _remove_final_layer_norm=config.pre_norm and not config.final_norm,
            enable_bias=config.attention_bias, layer_norm_elementwise_affine=True,
            activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.activation],
        )

    eos = config.extra.get("eos_token_ids") if isinstance(config.extra, dict) else None
    result.update(bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
                  eos_token_id=list(eos) if eos else config.eos_token_id)
    return result


def _check_hf_compatible(config: ModelConfig) -> None:
    """Raise CheckpointError when config.arch's HF class cannot hold this config."""
    problems = []

    def require(condition, message):
        if not condition:
            problems.append(message)

    if config.arch == "llama":
        require(config.norm == "rmsnorm", f"norm={config.norm!r} (LlamaForCausalLM uses rmsnorm)")
        require(config.activation == "swiglu", f"activation={config.activation!r} (LlamaForCausalLM uses swiglu)")
        require(config.position == "rope", f"position={config.position!r} (LlamaForCausalLM uses rope)")
        require(not config.rope_interleaved, "rope_interleaved=True (transformers uses the half-split layout)")
        require(config.attention_bias == config.attention_out_bias,
                "attention_bias differs from attention_out_bias (LlamaConfig has one flag for both)")
        require(not config.mlp_bias, "mlp_bias=True (LlamaConfig.mlp_bias would also expect a gate_proj bias)")
        require(config.embed_dim == config.hidden_size, "word_embed_proj_dim is set")
        require(config.pre_norm and config.final_norm, "pre_norm and final_norm must be True")
    elif config.arch == "gpt2":
        require(config.norm == "layernorm", f"norm={config.norm!r} (GPT2LMHeadModel uses layernorm)")
        require(config.activation in ("gelu_tanh", "gelu", "relu"), f"activation={config.activation!r}")
        require(config.position == "learned" and config.position_offset == 0,
                "GPT-2 needs learned positions with position_offset=0")
        require(config.num_kv_heads == config.num_heads, "GPT-2 has no grouped-query attention")
        require(config.head_dim * config.num_heads == config.hidden_size, "GPT-2 needs head_dim * num_heads == hidden_size")
        require(config.attention_bias and config.attention_out_bias and config.mlp_bias, "GPT-2 has biases everywhere")
        require(config.embed_dim == config.hidden_size, "word_embed_proj_dim is set")
        require(config.pre_norm and config.final_norm, "pre_norm and final_norm must be True")
    elif config.arch == "opt":
        require(config.norm == "layernorm", f"norm={config.norm!r} (OPTForCausalLM uses layernorm)")
        require(config.activation in ("relu", "gelu", "gelu_tanh"), f"activation={config.activation!r}")
        require(config.position == "learned" and config.position_offset == OPT_POSITION_OFFSET,
                f"OPT needs learned positions with position_offset={OPT_POSITION_OFFSET}")
        require(config.num_kv_heads == config.num_heads, "OPT has no grouped-query attention")
        require(config.head_dim * config.num_heads == config.hidden_size, "OPT needs head_dim * num_heads == hidden_size")
        require(config.attention_bias == config.attention_out_bias == config.mlp_bias,
                "OPT's enable_bias sets every linear bias at once")
        require(config.pre_norm or not config.final_norm, "post-norm OPT has no final norm")
        require(abs(config.norm_eps - 1e-5) < 1e-12, "OPT's LayerNorm eps is fixed at 1e-5")
    else:
        problems.append(f"arch={config.arch!r}")
    if problems:
        target = HF_CLASS_BY_MODEL_TYPE.get(config.arch, config.arch)
        raise CheckpointError(f"cannot save this config as {target}: " + "; ".join(problems))


# --------------------------------------------------------------------------- tensor names


@dataclass(frozen=True)
class HFTensor:
    """One tensor in an HF state dict and the skupy parameters stored in it.

    transposed: the HF tensor is the transpose of skupy's (GPT-2 Conv1D weights).
    Several skupy names mean the HF tensor stacks them along skupy's first axis
    (GPT-2's c_attn contains q, k and v).
    """

    hf_name: str
    skupy_names: tuple
    transposed: bool = False


_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(\w+)\.(weight|bias)$")

_LLAMA_NAMES = {
    "global": {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"},
    "layer": {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
              "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
              "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"},
    "layer_prefix": "model.layers",
}
_GPT2_NAMES = {
    "global": {"embed_tokens": "transformer.wte", "embed_positions": "transformer.wpe",
               "norm": "transformer.ln_f", "lm_head": "lm_head"},
    "layer": {"attn_norm": "ln_1", "o_proj": "attn.c_proj", "mlp_norm": "ln_2",
              "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"},
    "layer_prefix": "transformer.h",
}
_OPT_NAMES = {
    "global": {"embed_tokens": "model.decoder.embed_tokens", "embed_positions": "model.decoder.embed_positions",
               "project_in": "model.decoder.project_in", "project_out": "model.decoder.project_out",
               "norm": "model.decoder.final_layer_norm", "lm_head": "lm_head"},
    "layer": {"attn_norm": "self_attn_layer_norm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
              "v_proj": "self_attn.v_proj", "o_proj": "self_attn.out_proj", "mlp_norm": "final_layer_norm",
              "up_proj": "fc1", "down_proj": "fc2"},
    "layer_prefix": "model.decoder.layers",
}
_NAME_TABLES = {"llama": _LLAMA_NAMES, "gpt2": _GPT2_NAMES, "opt": _OPT_NAMES}

# GPT-2 Conv1D layers, stored (in_features, out_features).
_GPT2_CONV1D = {"o_proj", "up_proj", "down_proj"}


def hf_tensor_layout(config: ModelConfig) -> list:
    """List the HFTensor entries of config's HF state dict, in skupy's parameter order.

    LoRA parameters are not part of an HF checkpoint and are left out. A tied lm_head is
    left out too, as transformers' save_pretrained does.
    """
    table = _NAME_TABLES[config.arch]
    entries = []
    for name, _shape in param_specs(config, include_lora=False):
        match = _LAYER_NAME.match(name)
        if match is None:
            base, suffix = name.rsplit(".", 1)
            entries.append(HFTensor(f"{table['global'][base]}.{suffix}", (name,)))
            continue
        layer, kind, suffix = match.groups()
        prefix = f"{table['layer_prefix']}.{layer}."
        if config.arch == "gpt2" and kind in ("q_proj", "k_proj", "v_proj"):
            if kind == "q_proj":
                stacked = tuple(f"layers.{layer}.{part}.{suffix}" for part in ("q_proj", "k_proj", "v_proj"))
                entries.append(HFTensor(f"{prefix}attn.c_attn.{suffix}", stacked, transposed=suffix == "weight"))
            continue
        transposed = config.arch == "gpt2" and kind in _GPT2_CONV1D and suffix == "weight"
        entries.append(HFTensor(f"{prefix}{table['layer'][kind]}.{suffix}", (name,), transposed))
    return entries


def _canonical_hf_name(arch: str, name: str) -> str:
    """Add the module prefix that older GPT-2 and OPT checkpoints leave out."""
    if arch == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    if arch == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


def to_hf_state_dict(config: ModelConfig, params: dict) -> dict:
    """Convert skupy params to an HF state dict of contiguous float32 arrays.

    Raises CheckpointError when a parameter is missing, has the wrong shape or is not
    part of the model. LoRA parameters are skipped: merge them into the weights first.
    """
    expected = dict(param_specs(config, include_lora=False))
    unknown = sorted(name for name in params if name not in expected and not is_lora_name(name))
    if unknown:
        raise CheckpointError(f"parameters not in the model config: {', '.join(unknown[:5])}; "
                              "the expected names are skupy.layout.param_specs(config)")
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"missing parameter {name} (expected shape {shape})")
        actual = tuple(np.shape(params[name]))
        if actual != tuple(shape):
            raise CheckpointError(f"parameter {name} has shape {actual}, expected {tuple(shape)}")

    state = {}
    for entry in hf_tensor_layout(config):
        parts = [np.asarray(params[name], dtype=np.float32) for name in entry.skupy_names]
        tensor = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if entry.transposed:
            tensor = tensor.T
        state[entry.hf_name] = np.ascontiguousarray(tensor, dtype=np.float32)
    return state


# --------------------------------------------------------------------------- safetensors reading


_SAFETENSORS_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class SafetensorsReader:
    """Read tensors by name from one or more safetensors files, converting them to float32.

    safetensors.safe_open validates each header against the file size when it opens the
    file, so a header that claims more data than the file contains fails here, before any
    tensor is read. Use as a context manager.
    """

    def __init__(self, files: list):
        self._stack = ExitStack()
        self._handles = {}
        self._headers = {}
        self.files = [Path(file) for file in files]
        self.locations = {}

    def __enter__(self):
        from safetensors import SafetensorError, safe_open

        try:
            for file in self.files:
                try:
                    handle = self._stack.enter_context(safe_open(os.fspath(file), framework="numpy"))
                except (SafetensorError, OSError) as error:
                    raise CheckpointError(f"{file}: invalid safetensors file: {error}") from None
                self._handles[file] = handle
                for name in handle.keys():
                    if name in self.locations:
                        raise CheckpointError(f"{file}: tensor {name} also appears in {self.locations[name]}")
                    self.locations[name] = file
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self._stack.close()

    def names(self) -> list:
        return list(self.locations)

    def shape(self, name: str) -> tuple:
        return tuple(self._handles[self.locations[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.locations[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        """Return tensor name as a float32 array; raise CheckpointError for non-float dtypes."""
        file = self.locations[name]
        dtype = self.dtype(name)
        if dtype not in _SAFETENSORS_FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}; supported: F32, F16, BF16, F64")
        if dtype == "BF16":
            return self._read_bfloat16(file, name)
        return np.asarray(self._handles[file].get_tensor(name), dtype=np.float32)

    def _read_bfloat16(self, file: Path, name: str) -> np.ndarray:
        # numpy has no bfloat16, so the raw bits are read at the offsets the header gives
        # and widened: a bfloat16 is the upper 16 bits of a float32.
        header_size, header = self._header(file)
        start, end = header[name]["data_offsets"]
        shape = tuple(header[name]["shape"])
        count = (end - start) // 2
        bits = np.fromfile(file, dtype="<u2", count=count, offset=8 + header_size + start)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)

    def _header(self, file: Path) -> tuple:
        if file not in self._headers:
            with open(file, "rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                # safe_open has already checked header_size against the file size.
                self._headers[file] = (header_size, json.loads(handle.read(header_size)))
        return self._headers[file]


def find_weight_files(folder: Union[str, os.PathLike]) -> list:
    """Return the safetensors files of an HF folder, from model.safetensors or its shard index.

    Raises CheckpointError when the folder has only pickled PyTorch weights, and
    CheckpointNotFoundError when it has no weights.
    """
    folder = Path(folder)
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    index_path = folder / SAFETENSORS_INDEX_FILE
    if index_path.is_file():
        return _shard_files(index_path)

    pickled = [name for name in PICKLED_WEIGHT_FILES if (folder / name).exists()]
    pickled += sorted(path.name for path in folder.glob("pytorch_model-*.bin"))
    if pickled:
        raise CheckpointError(
            f"{folder}: only pickled PyTorch weights found ({', '.join(pickled)}). skupy does not unpickle files, "
            "because unpickling can run arbitrary code. Convert the checkpoint to safetensors, for example with "
            "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, "
            "safe_serialization=True)")
    others = sorted(path.name for path in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}, which are not model weights by name)" if others else ""
    raise CheckpointNotFoundError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} found{hint}")


def _shard_files(index_path: Path) -> list:
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: invalid safetensors index: 'weight_map' must be a non-empty object")
    not_names = [shard for shard in weight_map.values() if not isinstance(shard, str)]
    if not_names:
        raise CheckpointError(f"{index_path}: invalid safetensors index: 'weight_map' values must be shard file "
                              f"names, got {not_names[0]!r}")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: invalid shard file name {shard!r}; shards must be in the same folder")
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointNotFoundError(f"{index_path}: shard {shard} is missing from {index_path.parent}")
        files.append(shard_path)
    return files


# --------------------------------------------------------------------------- load and save


def load_hf(folder: Union[str, os.PathLike]):
    """Load an HF checkpoint folder and return (ModelConfig, params).

    params maps skupy names (in skupy.layout.param_specs order) to float32 arrays.
    Raises CheckpointNotFoundError when config.json or the weights are missing, and
    CheckpointError for unsupported architectures, pickled weights, corrupt files and
    tensors whose names or shapes do not match the config.
    """
    folder = Path(folder)
    config = load_hf_config(folder)
    with SafetensorsReader(find_weight_files(folder)) as reader:
        params = _read_params(config, reader, folder)
    return config, params


def load_hf_config(folder: Union[str, os.PathLike]) -> ModelConfig:
    """Read config.json (and generation_config.json when present) of an HF folder into a ModelConfig.

    Raises CheckpointNotFoundError when the folder or config.json is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise CheckpointError(f"{folder}: expected a Hugging Face checkpoint folder, got a file")
        raise CheckpointNotFoundError(f"checkpoint folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{folder}: config.json is missing; a Hugging Face checkpoint folder needs config.json next to its weights")
    config = config_from_hf(read_json(config_path, "config.json"), source=str(config_path))
    generation_path = folder / "generation_config.json"
    if generation_path.is_file():
        config.extra["hf_generation_config"] = read_json(generation_path, "generation_config.json")
    return config


def _read_params(config: ModelConfig, reader: SafetensorsReader, folder: Path) -> dict:
    available = {_canonical_hf_name(config.arch, name): name for name in reader.names()}
    # Each layer has several tensors, and listing the layers of a forged layer count
    # would take minutes, so a count above the number of tensors fails first.
    if config.num_layers > len(available):
        raise CheckpointError(f"{folder}: config.json has {config.num_layers} layers but the safetensors "
                              f"weights hold only {len(available)} tensors")
    layout = hf_tensor_layout(config)
    expected_shapes = dict(param_specs(config, include_lora=False))

    # Check names and shapes of everything before reading any tensor data.
    for entry in layout:
        if entry.hf_name not in available:
            raise CheckpointError(f"{folder}: tensor {entry.hf_name} is missing from the safetensors weights")
        parts = [expected_shapes[name] for name in entry.skupy_names]
        shape = (sum(part[0] for part in parts), *parts[0][1:])
        if entry.transposed:
            shape = tuple(reversed(shape))
        actual = reader.shape(available[entry.hf_name])
        if tuple(actual) != tuple(shape):
            raise CheckpointError(
                f"{reader.locations[available[entry.hf_name]]}: tensor {entry.hf_name} has shape {tuple(actual)} "
                f"but config.json implies {tuple(shape)}")
    used = {entry.hf_name for entry in layout}
    unexpected = sorted(name for name in available if name not in used and not _ignorable(config, name))
    if unexpected:
        listed = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"{folder}: tensors not used by a {HF_CLASS_BY_MODEL_TYPE[config.arch]} with this config.json: {listed}")

    params = {}
    for entry in layout:
        tensor = reader.read(available[entry.hf_name])
        if entry.transposed:
            tensor = tensor.T
        offset = 0
        for name in entry.skupy_names:
            rows = expected_shapes[name][0]
            params[name] = np.ascontiguousarray(tensor[offset:offset + rows], dtype=np.float32)
            offset += rows
    return {name: params[name] for name in expected_shapes}


def _ignorable(config: ModelConfig, hf_name: str) -> bool:
    if _IGNORED_HF_TENSORS.search(hf_name):
        return True
    # With tied embeddings transformers ignores a stored lm_head and uses the embedding.
    return config.tie_word_embeddings and hf_name == "lm_head.weight"


def generation_config_from_model_config(config: ModelConfig) -> dict:
    """Return generation_config.json contents: the source's, with skupy's special token ids."""
    source = config.extra.get("hf_generation_config") if isinstance(config.extra, dict) else None
    result = {key: value for key, value in (source or {}).items() if key != "transformers_version"}
    eos = config.extra.get("eos_token_ids") if isinstance(config.extra, dict) else None
    for key, value in (("bos_token_id", config.bos_token_id), ("pad_token_id", config.pad_token_id),
                       ("eos_token_id", list(eos) if eos else config.eos_token_id)):
        if value is not None:
            result[key] = value
    return result


def save_hf(folder: Union[str, os.PathLike], config: ModelConfig, params: dict, tokenizer=None) -> Path:
    """Write an HF checkpoint folder that transformers' from_pretrained loads, and return its path.

    Writes config.json, generation_config.json, model.safetensors (float32, HF names and
    layouts, tied weights once) and, when tokenizer is given, its files. Everything is
    written to a temporary sibling folder, fsynced, and renamed into place, so an existing
    folder is replaced only by a complete new one. LoRA parameters are not saved: merge
    them into the base weights first.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    state = to_hf_state_dict(config, params)
    hf_config = hf_config_from_model_config(config)
    generation_config = generation_config_from_model_config(config)

    with atomic_folder(folder) as temp_folder:
        save_file(state, os.fspath(temp_folder / SAFETENSORS_FILE), metadata={"format": "pt"})
        (temp_folder / "config.json").write_text(_json_text(hf_config), encoding="utf-8")
        (temp_folder / "generation_config.json").write_text(_json_text(generation_config), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(temp_folder)
    return folder


__all__ = [
    "HFTensor",
    "HF_CLASS_BY_MODEL_TYPE",
    "SUPPORTED_ARCHITECTURES",
    "SafetensorsReader",
    "config_from_hf",
    "find_weight_files",
    "generation_config_from_model_config",
    "hf_architecture",
    "hf_config_from_model_config",
    "hf_tensor_layout",
    "load_hf",
    "load_hf_config",
    "read_json",
    "save_hf",
    "to_hf_state_dict",
]
