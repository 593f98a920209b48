"""The Model object: named NumPy parameters driven by the C engine.

Parameters, gradients and optimizer state are NumPy arrays owned by Python,
so users can read and edit them between calls. The C engine keeps only
activation buffers, sized once per (B, T).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

from . import _core
from .config import ModelConfig
from .layout import is_lora_name, param_specs

_INT32_MAX = np.iinfo(np.int32).max


def engine_config(config: ModelConfig, recompute: bool = False) -> dict:
    """Translate a ModelConfig into the plain dict the C engine parses."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "embed_dim": config.embed_dim,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "position_offset": config.position_offset,
        "norm": config.norm,
        "activation": config.activation,
        "position": config.position,
        "rope_interleaved": int(config.rope_interleaved),
        "tie_word_embeddings": int(config.tie_word_embeddings),
        "attention_bias": int(config.attention_bias),
        "attention_out_bias": int(config.attention_out_bias),
        "mlp_bias": int(config.mlp_bias),
        "pre_norm": int(config.pre_norm),
        "final_norm": int(config.final_norm),
        "norm_eps": config.norm_eps,
        "lora_rank": config.lora_rank,
        "lora_scale": config.lora_scale,
        "lora_targets": list(config.lora_targets),
        "recompute": int(recompute),
    }


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Compute RoPE inverse frequencies (head_dim/2,) in float32, with HF's rope_scaling types.

    Supports no scaling, "linear", and "llama3" (Llama 3.1 style smoothing);
    other types raise ValueError.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: linear, llama3")


def init_params(config: ModelConfig, seed: int = 0, std: float = 0.02, frozen_bfloat16: bool = False) -> dict:
    """Create random parameters: N(0, std) weights, unit norm weights, zero biases.

    LoRA A gets N(0, 1/r) and LoRA B zeros, so a fresh adapter changes nothing.
    frozen_bfloat16=True stores block linear weights as bfloat16 (uint16 arrays),
    one tensor at a time, so a large model never exists in float32.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_specs(config):
        if name.endswith(".lora_B") or name.endswith(".bias"):
            params[name] = np.zeros(shape, np.float32)
        elif name.endswith(".lora_A"):
            params[name] = (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(config.lora_rank))
        elif "norm" in name:
            params[name] = np.ones(shape, np.float32)
        else:
            weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            params[name] = to_bfloat16(weight) if frozen_bfloat16 and is_block_linear_weight(name) else weight
    return params


def is_block_linear_weight(name: str) -> bool:
    """Return whether name is a block linear weight, the only kind that may be stored in bfloat16."""
    return name.startswith("layers.") and name.endswith("_proj.weight")


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the bits as uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def as_token_array(tokens, name: str = "tokens") -> np.ndarray:
    """Convert token ids (any integer array or nested list, 1-D or 2-D) to int32 (B, T)."""
    array = np.asarray(tokens)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (B, T), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must contain integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > _INT32_MAX):
        raise ValueError(f"{name} contains ids outside [0, {_INT32_MAX}]: min {array.min()}, max {array.max()}")
    return np.ascontiguousarray(array, dtype=np.int32)


def default_positions(mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only, so left padding does not shift them.

    Padding positions get the last real position (or 0); they never affect real tokens.
    """
    positions = np.cumsum(mask, axis=1, dtype=np.int64) - 1
    return np.ascontiguousarray(np.maximum(positions, 0), dtype=np.int32)


class Model:
    """A decoder-only transformer whose weights are a dict of NumPy arrays.

    params maps skupy parameter names (skupy.layout) to float32 arrays.
    trainable selects which parameters get gradients: "auto" means the LoRA
    adapters when config.lora_rank > 0 and every parameter otherwise.
    recompute=True keeps only each block's input during forward and recomputes
    the rest in backward: about one extra forward of compute for a large cut in
    activation memory.
    """

    def __init__(self, config: ModelConfig, params: Optional[dict] = None, *, recompute: bool = False,
                 trainable="auto", seed: int = 0, tokenizer=None):
        # Block linear weights may be given as uint16 bfloat16 arrays (see to_bfloat16): the engine
        # widens one block at a time, so frozen weights take half the memory. They cannot be trained.
        self.config = config
        self.recompute = recompute
        self.tokenizer = tokenizer
        self.engine = _core.Engine(engine_config(config, recompute))
        self.specs = [(name, tuple(shape)) for name, shape in self.engine.param_specs()]
        if config.position == "rope":
            self.engine.set_inv_freq(rope_inv_freq(config))

        if params is None:
            params = init_params(config, seed)
        self.params = self._checked_params(params, seed)
        self.set_trainable(trainable)

    def _checked_params(self, params: dict, seed: int) -> dict:
        expected = dict(self.specs)
        unknown = sorted(set(params) - set(expected))
        if unknown:
            raise ValueError(f"unknown parameter names for this config: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        missing = [name for name in expected if name not in params and not is_lora_name(name)]
        if missing:
            raise ValueError(f"missing parameters: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

        checked = {}
        fresh_lora = None
        for name, shape in self.specs:
            if name not in params:
                if fresh_lora is None:
                    fresh_lora = init_params(self.config, seed)
                checked[name] = fresh_lora[name]
                continue
            array = np.asarray(params[name])
            if array.shape != shape:
                raise ValueError(f"parameter {name} has shape {array.shape}, expected {shape}")
            if array.dtype == np.uint16:
                if not is_block_linear_weight(name):
                    raise ValueError(f"parameter {name} is uint16 (bfloat16); only block linear weights "
                                     "(layers.*_proj.weight) may be stored in bfloat16")
                checked[name] = np.ascontiguousarray(array)
            else:
                checked[name] = np.ascontiguousarray(array, dtype=np.float32)
        return checked

    # ------------------------------------------------------------------
    # trainable parameters and gradients

    def set_trainable(self, trainable="auto") -> None:
        """Choose the parameters that get gradients ("auto", "all", "lora" or a list of names)."""
        names = [name for name, _ in self.specs]
        if trainable == "auto":
            trainable = "lora" if self.config.lora_rank > 0 else "all"
        if trainable == "all":
            selected = [n for n in names if not is_lora_name(n)] if self.config.lora_rank == 0 else names
        elif trainable == "lora":
            selected = [n for n in names if is_lora_name(n)]
            if not selected:
                raise ValueError("trainable='lora' but the config has no LoRA adapters (lora_rank=0)")
        else:
            selected = list(trainable)
            unknown = sorted(set(selected) - set(names))
            if unknown:
                raise ValueError(f"unknown trainable parameter names: {', '.join(unknown[:5])}")
        frozen_only = [n for n in selected if self.params[n].dtype == np.uint16]
        if frozen_only:
            raise ValueError(f"{frozen_only[0]} is stored in bfloat16, which is for frozen weights only; "
                             "train LoRA adapters (trainable='lora') or load the weights in float32")
        self.trainable = [n for n in names if n in set(selected)]
        self.grads = {name: np.zeros(self.params[name].shape, np.float32) for name in self.trainable}

    def zero_grad(self) -> None:
        for grad in self.grads.values():
            grad.fill(0.0)

    def param_list(self, params: Optional[dict] = None) -> list:
        source = self.params if params is None else params
        return [source[name] for name, _ in self.specs]

    def _grad_list(self) -> list:
        return [self.grads.get(name) for name, _ in self.specs]

    # ------------------------------------------------------------------
    # forward passes

    def _inputs(self, tokens, mask=None, positions=None):
        tokens = as_token_array(tokens)
        if mask is None:
            mask = np.ones(tokens.shape, np.int32)
        else:
            mask = np.asarray(mask)
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != tokens.shape:
                raise ValueError(f"mask has shape {mask.shape}, expected the tokens' shape {tokens.shape}")
            mask = np.ascontiguousarray(mask != 0, dtype=np.int32)
        if positions is None:
            positions = default_positions(mask)
        else:
            positions = as_token_array(positions, "positions")
            if positions.shape != tokens.shape:
                raise ValueError(f"positions has shape {positions.shape}, expected {tokens.shape}")
        return tokens, mask, positions

    def run(self, tokens, mask=None, positions=None, *, use_lora: bool = True, params: Optional[dict] = None,
            head_rows=None):
        """Run the forward pass and keep its logits inside the engine; returns (tokens, mask) as int32.

        head_rows (increasing indices into the flattened B*T rows) limits the LM head to
        those rows; losses computed afterwards must give every other row zero weight.
        """
        tokens, mask, positions = self._inputs(tokens, mask, positions)
        if head_rows is not None:
            head_rows = as_row_indices(head_rows)
        self.engine.forward(self.param_list(params), tokens, positions, mask, use_lora, head_rows)
        return tokens, mask

    def forward(self, tokens, mask=None, positions=None, *, use_lora: bool = True,
                params: Optional[dict] = None) -> np.ndarray:
        """Return logits (B, T, V) float32 for token ids (B, T) and a padding mask (1 = real token).

        params overrides the model's own parameters for this call (same names and
        shapes), e.g. the frozen original weights; use_lora=False runs the base model.
        """
        self.run(tokens, mask, positions, use_lora=use_lora, params=params)
        return self.engine.logits()

    __call__ = forward

    def hidden_states(self, tokens, mask=None, positions=None, *, use_lora: bool = True) -> np.ndarray:
        """Return the LM head's input (B, T, E): the final normalized hidden states."""
        self.run(tokens, mask, positions, use_lora=use_lora)
        return self.engine.hidden()

    def token_nll(self, tokens, targets, weights, mask=None, positions=None, *, use_lora: bool = True):
        """Return (weighted sum, per-position NLL (B, T)) of targets under the model; no gradient.

        Only positions with a nonzero weight are scored; the NLL is 0 at the others.
        """
        weights = _f32(weights)
        self.run(tokens, mask, positions, use_lora=use_lora, head_rows=weighted_rows(weights, tokens))
        return self.engine.cross_entropy(_f32(targets, np.int32), weights)

    # ------------------------------------------------------------------
    # gradient passes

    def accumulate_ce(self, tokens, targets, weights, mask=None, positions=None, *, scale: float = 1.0) -> float:
        """Add scale * d/dθ [Σ weights · NLL(targets)] to self.grads; return the weighted sum.

        Weighted sum = Σ_{b,t} weights[b,t] · (−log p(targets[b,t] | tokens[b,:t+1])).
        """
        weights = _f32(weights)
        self.run(tokens, mask, positions, head_rows=weighted_rows(weights, tokens))
        total, _ = self.engine.cross_entropy(_f32(targets, np.int32), weights, scale)
        self.engine.backward(self.param_list(), self._grad_list())
        return total

    def accumulate_kl(self, tokens, ref_logits, weights, mask=None, positions=None, *, scale: float = 1.0,
                      reverse: bool = False) -> float:
        """Add scale * d/dθ [Σ weights · KL(p_ref ‖ p_θ)] to self.grads; return the weighted sum.

        reverse=True uses KL(p_θ ‖ p_ref) instead.
        """
        self.run(tokens, mask, positions)
        total, _ = self.engine.kl_div(_f32(ref_logits), _f32(weights), reverse, scale)
        self.engine.backward(self.param_list(), self._grad_list())
        return total

    # ------------------------------------------------------------------
    # generation

    def generate_ids(self, prompts, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, stop_ids=None, pad_id: Optional[int] = None,
                     use_lora: bool = True) -> list:
        """Generate from prompts given as lists of token ids; returns one list of new ids per prompt.

        Prompts are left-padded into one batch; a row stops after a token in
        stop_ids (kept in its output). temperature=0 is greedy decoding.
        """
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1 or prompts and np.isscalar(prompts[0]):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        rows = [as_token_array(p, "prompt")[0] for p in prompts]
        if any(len(row) == 0 for row in rows):
            raise ValueError("a prompt has no tokens; every prompt needs at least one token")
        if pad_id is None:
            pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        width = max(len(row) for row in rows)
        tokens = np.full((len(rows), width), pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            tokens[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        stop = None if not stop_ids else np.asarray(list(stop_ids), np.int32)
        new_tokens, lengths = self.engine.generate(
            self.param_list(), tokens, mask, int(max_new_tokens), float(temperature), int(top_k),
            float(top_p), int(seed) % (1 << 64), stop, int(pad_id), use_lora)
        return [new_tokens[i, : lengths[i]].tolist() for i in range(len(rows))]

    def generate(self, prompts, max_new_tokens: int = 64, *, chat: bool = True, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_lora: bool = True):
        """Generate text for one prompt (returns a str) or a list of prompts (returns a list of str).

        chat=True wraps each prompt as a user message in the tokenizer's chat
        template; chat=False feeds the text as it is. Stops at the end-of-sequence
        token (and the chat template's end-of-turn token).
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; load it with skupy.load() or pass token ids "
                             "to generate_ids()")
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if chat:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                        add_generation_prompt=True) for text in texts]
        ids = [self.tokenizer.encode(text) for text in texts]
        stop_ids = self.tokenizer.stop_token_ids() if hasattr(self.tokenizer, "stop_token_ids") else \
            [self.tokenizer.eos_token_id]
        outputs = self.generate_ids(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, stop_ids=[i for i in stop_ids if i is not None],
                                    pad_id=self.tokenizer.pad_token_id, use_lora=use_lora)
        answers = [self.tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
        return answers[0] if single else answers

    # ------------------------------------------------------------------
    # LoRA

    def lora_names(self) -> list:
        return [name for name, _ in self.specs if is_lora_name(name)]

    def merged_params(self) -> dict:
        """Return base parameters with every LoRA delta B·A·(alpha/r) merged in (new arrays)."""
        if any(array.dtype == np.uint16 for array in self.params.values()):
            raise ValueError("cannot merge LoRA into bfloat16 weights; load the base model in float32 to merge")
        merged = {name: array.copy() for name, array in self.params.items() if not is_lora_name(name)}
        for name in self.lora_names():
            if name.endswith(".lora_A"):
                prefix = name[: -len(".lora_A")]
                _core.lora_merge(merged[prefix + ".weight"], self.params[name], self.params[prefix + ".lora_B"],
                                 self.config.lora_scale)
        return merged

    def save(self, folder) -> None:
        """Write an HF folder (config.json, model.safetensors, tokenizer files), LoRA merged in, atomically."""
        from .hf_io import save_hf

        if self.config.lora_rank > 0:
            save_hf(folder, self.base_config(), self.merged_params(), self.tokenizer)
        else:
            save_hf(folder, self.config, self.params, self.tokenizer)

    def base_config(self) -> ModelConfig:
        """Return the config without LoRA adapters, the one merged_params() fits."""
        return self.config.replace(lora_rank=0)

    def num_parameters(self, trainable_only: bool = False) -> int:
        names = self.trainable if trainable_only else list(self.params)
        return int(sum(self.params[name].size for name in names))


def as_row_indices(rows) -> np.ndarray:
    """Return rows as a contiguous int32 array; raise TypeError for non-integers, ValueError beyond int32."""
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise TypeError(f"head_rows must contain integer row indices, got dtype {rows.dtype}")
    if rows.size and (rows.min() < np.iinfo(np.int32).min or rows.max() > np.iinfo(np.int32).max):
        raise ValueError(f"head_rows has values outside the int32 range (from {rows.min()} to {rows.max()})")
    return np.ascontiguousarray(rows, dtype=np.int32)


def weighted_rows(weights: np.ndarray, tokens) -> Optional[np.ndarray]:
    """Flattened indices of the rows with a nonzero weight, for Model.run's head_rows.

    None (logits on every row) when every row or no row has weight, or when the
    shapes disagree, so that the loss call reports the shape error itself.
    """
    if weights.shape != np.shape(tokens):
        return None
    rows = np.flatnonzero(weights.reshape(-1))
    if rows.size == 0 or rows.size == weights.size:
        return None
    return rows.astype(np.int32)


def _f32(array, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array), dtype=dtype)
