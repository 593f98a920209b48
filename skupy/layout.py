"""Parameter names and shapes of skupy's transformer, in the order the C engine takes them.

The C engine (csrc/engine.c) computes the same list from the same config; a
test checks that the two agree. Names are skupy's own and the same for every
architecture, so a GGUF or HF checkpoint is mapped to them once at load time:

    embed_tokens.weight         (V, E)
    embed_positions.weight      (max_position_embeddings + position_offset, C)  learned positions
    project_in.weight           (C, E)   OPT when E != C
    project_out.weight          (E, C)   OPT when E != C
    norm.weight, norm.bias      (C,)     final norm; bias for LayerNorm
    lm_head.weight              (V, E)   absent when tied to embed_tokens
    layers.{i}.attn_norm.weight/.bias    (C,)
    layers.{i}.q_proj.weight    (NH*HS, C)   .bias (NH*HS,) with attention_bias
    layers.{i}.k_proj.weight    (NKV*HS, C)  .bias
    layers.{i}.v_proj.weight    (NKV*HS, C)  .bias
    layers.{i}.o_proj.weight    (C, NH*HS)   .bias with attention_out_bias
    layers.{i}.mlp_norm.weight/.bias     (C,)
    layers.{i}.gate_proj.weight (F, C)   SwiGLU only
    layers.{i}.up_proj.weight   (F, C)   .bias with mlp_bias (GPT-2 c_fc, OPT fc1)
    layers.{i}.down_proj.weight (C, F)   .bias with mlp_bias (GPT-2 mlp.c_proj, OPT fc2)
    layers.{i}.{target}.lora_A  (r, in)  LoRA, for each target in lora_targets
    layers.{i}.{target}.lora_B  (out, r)

Weights use the PyTorch nn.Linear layout (out_features, in_features).
"""
from __future__ import annotations

from .config import LORA_TARGETS, ModelConfig


def linear_shapes(config: ModelConfig) -> dict:
    """Map each linear layer of a block to its (out_features, in_features)."""
    C, F = config.hidden_size, config.intermediate_size
    q_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    shapes = {
        "q_proj": (q_width, C),
        "k_proj": (kv_width, C),
        "v_proj": (kv_width, C),
        "o_proj": (C, q_width),
        "gate_proj": (F, C),
        "up_proj": (F, C),
        "down_proj": (C, F),
    }
    if config.activation != "swiglu":
        del shapes["gate_proj"]
    return shapes


def linear_has_bias(config: ModelConfig, name: str) -> bool:
    if name in ("q_proj", "k_proj", "v_proj"):
        return config.attention_bias
    if name == "o_proj":
        return config.attention_out_bias
    return config.mlp_bias and name != "gate_proj"


def param_specs(config: ModelConfig, include_lora: bool = True) -> list:
    """List (name, shape) for every parameter, in the engine's order."""
    V, C, E = config.vocab_size, config.hidden_size, config.embed_dim
    layernorm = config.norm == "layernorm"
    specs = [("embed_tokens.weight", (V, E))]
    if config.position == "learned":
        specs.append(("embed_positions.weight", (config.max_position_embeddings + config.position_offset, C)))
    if E != C:
        specs.append(("project_in.weight", (C, E)))
        specs.append(("project_out.weight", (E, C)))
    if config.final_norm:
        specs.append(("norm.weight", (C,)))
        if layernorm:
            specs.append(("norm.bias", (C,)))
    if not config.tie_word_embeddings:
        specs.append(("lm_head.weight", (V, E)))

    shapes = linear_shapes(config)
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        specs.append((prefix + "attn_norm.weight", (C,)))
        if layernorm:
            specs.append((prefix + "attn_norm.bias", (C,)))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs += _linear_specs(config, prefix, name, shapes[name])
        specs.append((prefix + "mlp_norm.weight", (C,)))
        if layernorm:
            specs.append((prefix + "mlp_norm.bias", (C,)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            if name in shapes:
                specs += _linear_specs(config, prefix, name, shapes[name])
        if include_lora and config.lora_rank > 0:
            for name in LORA_TARGETS:
                if name in config.lora_targets and name in shapes:
                    out_features, in_features = shapes[name]
                    specs.append((prefix + name + ".lora_A", (config.lora_rank, in_features)))
                    specs.append((prefix + name + ".lora_B", (out_features, config.lora_rank)))
    return specs


def _linear_specs(config, prefix, name, shape):
    specs = [(prefix + name + ".weight", shape)]
    if linear_has_bias(config, name):
        specs.append((prefix + name + ".bias", (shape[0],)))
    return specs


def is_lora_name(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")
