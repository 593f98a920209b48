"""Model architecture configuration shared by the loaders, the C engine and the savers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

ARCHITECTURES = ("llama", "gpt2", "opt")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "gelu_tanh", "gelu", "relu")
POSITIONS = ("rope", "learned")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    """Shape and wiring of a decoder-only transformer.

    One config covers LLaMA (RMSNorm, RoPE, SwiGLU, GQA), GPT-2 (LayerNorm,
    learned positions, GELU-tanh, tied head) and OPT (LayerNorm, learned
    positions offset by 2, ReLU, pre- or post-norm, optional projections).
    Parameter names and shapes follow from it; see skupy.layout.param_specs.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512              # C
    num_layers: int = 4                 # L
    num_heads: int = 8                  # NH
    num_kv_heads: Optional[int] = None  # NKV; None means num_heads (no grouping)
    head_dim: Optional[int] = None      # HS; None means hidden_size // num_heads
    intermediate_size: int = 1376       # F, the MLP hidden width
    max_position_embeddings: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    position: str = "rope"
    position_offset: int = 0            # OPT stores positions shifted by 2
    rope_theta: float = 10000.0
    rope_interleaved: bool = False      # False: HF LLaMA half-split pairs (i, i+HS/2)
    rope_scaling: Optional[dict] = None  # HF rope_scaling dict (e.g. Llama 3 "llama3" type)
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # biases on q, k, v projections
    attention_out_bias: bool = False    # bias on the output projection
    mlp_bias: bool = False
    pre_norm: bool = True               # False: OPT-350m's post-norm blocks
    final_norm: bool = True
    word_embed_proj_dim: Optional[int] = None  # OPT's E when it differs from hidden_size
    lora_rank: int = 0                  # r; 0 disables LoRA
    lora_alpha: float = 16.0            # LoRA scale is lora_alpha / lora_rank
    lora_targets: tuple = ("q_proj", "v_proj")
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict)  # source config entries kept for saving

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        self.lora_targets = tuple(self.lora_targets)
        self.validate()

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (E); equals hidden_size except for some OPT models."""
        return self.word_embed_proj_dim or self.hidden_size

    def validate(self) -> None:
        """Raise ValueError naming the first field that is inconsistent."""
        def require(condition, message):
            if not condition:
                raise ValueError(f"invalid ModelConfig: {message}")

        require(self.arch in ARCHITECTURES, f"arch={self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        require(self.norm in NORMS, f"norm={self.norm!r}; supported: {', '.join(NORMS)}")
        require(self.activation in ACTIVATIONS,
                f"activation={self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        require(self.position in POSITIONS, f"position={self.position!r}; supported: {', '.join(POSITIONS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")
        require(self.num_heads % self.num_kv_heads == 0,
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        require(self.position != "rope" or self.head_dim % 2 == 0,
                f"head_dim={self.head_dim} must be even for rotary embeddings")
        require(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        require(self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be >= 0")
        for target in self.lora_targets:
            require(target in LORA_TARGETS, f"lora target {target!r}; supported: {', '.join(LORA_TARGETS)}")
        if self.activation != "swiglu":
            require("gate_proj" not in self.lora_targets or self.lora_rank == 0,
                    "gate_proj is a LoRA target but the MLP has no gate (activation is not swiglu)")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
