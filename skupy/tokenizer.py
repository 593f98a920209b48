"""Tokenizer used by the rest of skupy: a `tokenizers.Tokenizer` plus special tokens and a chat template.

A Tokenizer comes from a Hugging Face folder (tokenizer.json, or vocab.json + merges.txt)
or from the vocabulary and merges stored in a GGUF file. A GGUF byte-level BPE
vocabulary ("tokenizer.ggml.model" = "gpt2") is rebuilt the way transformers builds it
from the same file, so both give the same token ids.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from .atomic import atomic_write_text
from .checkpoint import CheckpointError, CheckpointNotFoundError

# tokenizer.json of large vocabularies is tens of MB; a file past this limit is not one.
MAX_TOKENIZER_FILE_BYTES = 512 * 1024 * 1024

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4

# Split patterns of tokenizer.ggml.pre values whose vocabulary was trained on other
# pre-tokenization than GPT-2's. This is Llama 3's pattern (also used by tiktoken's cl100k).
_LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_SPLIT_PATTERNS = {"llama-bpe": _LLAMA3_SPLIT_PATTERN, "llama3": _LLAMA3_SPLIT_PATTERN,
                       "llama-v3": _LLAMA3_SPLIT_PATTERN}

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def format_sku_prompt(question: str, answer: Optional[str] = None) -> str:
    """Format a question and answer the way SKU training data is written.

    With answer None, return the prompt up to and including "### Answer:", which is
    what a model is asked to continue.
    """
    prefix = f"### Question: {question}\n ### Answer:"
    if answer is None:
        return prefix
    return f"{prefix} {answer}"


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of its model."""

    def __init__(self, backend, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, unk_token: Optional[str] = None,
                 chat_template: Optional[str] = None, add_bos_token: bool = False, add_eos_token: bool = False,
                 model_max_length: Optional[int] = None):
        # Padding and truncation settings stored in some tokenizer.json files would
        # silently change encode() results, so they are switched off.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.model_max_length = model_max_length

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        """Return the token ids of text; add_special_tokens adds the BOS/EOS that the post-processor defines."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple:
        """Return (ids, offsets), where offsets[i] = (start, end) character offsets of token i in text.

        A character split across several byte-level tokens gives each of them the span of
        that whole character. A byte-level token with a leading space includes the space.
        """
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [tuple(offset) for offset in encoding.offsets]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list:
        """Return the token ids of each text, encoded in parallel by the tokenizers library."""
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(token) for token in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(int(token_id))

    # ----------------------------------------------------------------- special tokens

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._special_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._special_id(self.eos_token)

    @property
    def unk_token_id(self) -> Optional[int]:
        return self._special_id(self.unk_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        """Id of the padding token, or of the EOS token when the tokenizer has no padding token."""
        token_id = self._special_id(self.pad_token)
        return token_id if token_id is not None else self.eos_token_id

    def _special_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def special_tokens(self) -> dict:
        """Map bos_token, eos_token, unk_token and pad_token to their strings, leaving out unset ones."""
        return {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name) is not None}

    # ----------------------------------------------------------------- prompts

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables) -> str:
        """Render messages with the model's chat template and return the prompt text.

        The template is rendered with jinja2 the way transformers renders it (sandboxed,
        trim_blocks and lstrip_blocks on). Without jinja2, ChatML templates such as
        SmolLM2's are rendered by a built-in renderer, and other templates raise ImportError.
        Extra keyword arguments become template variables.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template; set Tokenizer.chat_template first")
        messages = [dict(message) for message in messages]
        try:
            import jinja2  # noqa: F401
        except ImportError:
            if "<|im_start|>" not in self.chat_template:
                raise ImportError("rendering this chat template needs jinja2: pip install jinja2") from None
            return render_chatml(messages, add_generation_prompt, default_system_prompt(self.chat_template))
        return render_chat_template(self.chat_template, messages=messages,
                                    add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens(), **variables})

    format_sku_prompt = staticmethod(format_sku_prompt)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_tokenizer_json(cls, path: Union[str, os.PathLike], **settings) -> "Tokenizer":
        """Load a tokenizer.json file; settings are the keyword arguments of Tokenizer()."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        text = _read_limited_text(path, "tokenizer.json")
        try:
            backend = Backend.from_str(text)
        except Exception as error:  # the tokenizers library raises plain Exception
            raise CheckpointError(f"{path}: invalid tokenizer.json: {error}") from None
        return cls(backend, **settings)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load a tokenizer from an HF folder, a tokenizer.json file, or a .gguf file.

        In a folder, tokenizer.json is used, else vocab.json with merges.txt (GPT-2 and OPT).
        Special tokens, add_bos_token and the chat template come from tokenizer_config.json,
        special_tokens_map.json and chat_template.jinja when present. Raises
        CheckpointNotFoundError when there is no tokenizer.
        """
        path = Path(path)
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return cls.from_gguf(path)
            return cls.from_tokenizer_json(path, **_folder_settings(path.parent))
        if not path.is_dir():
            raise CheckpointNotFoundError(f"tokenizer not found: {path} does not exist")

        settings = _folder_settings(path)
        if (path / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(path / "tokenizer.json", **settings)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls(_byte_level_bpe_from_files(path, settings), **settings)
        if (path / "tokenizer.model").is_file():
            raise CheckpointError(
                f"{path}: only a SentencePiece tokenizer.model was found, which skupy cannot read; "
                "save the tokenizer with transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder)) "
                "to create tokenizer.json")
        raise CheckpointNotFoundError(
            f"{path}: no tokenizer found; expected tokenizer.json, or vocab.json with merges.txt")

    @classmethod
    def from_gguf(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Build the tokenizer stored in a GGUF file's metadata."""
        from .gguf_io import open_gguf, read_metadata

        reader = open_gguf(path)
        return cls.from_gguf_metadata(read_metadata(reader, path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "GGUF file") -> "Tokenizer":
        """Build a byte-level BPE tokenizer from GGUF metadata (as returned by skupy.gguf_io.load_gguf).

        Mirrors transformers 5's GGUF conversion: tokens spelled outside the GPT-2 byte
        alphabet are re-spelled byte by byte, control tokens become special added tokens,
        user-defined tokens become plain added tokens, and encode adds BOS/EOS only
        when tokenizer.ggml.add_bos_token/add_eos_token are true.
        """
        return cls(_byte_level_bpe_from_gguf(metadata, source), **_gguf_settings(metadata))

    # ----------------------------------------------------------------- saving

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into folder.

        Each file is replaced atomically. transformers' AutoTokenizer loads the result.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            **self.special_tokens(),
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        atomic_write_text(folder / "tokenizer_config.json", _json_text(config))
        atomic_write_text(folder / "special_tokens_map.json", _json_text(self.special_tokens()))
        return folder

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


# --------------------------------------------------------------------------- chat templates


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    from jinja2 import TemplateError, ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format_string):
        return datetime.datetime.now().strftime(format_string)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(template)


def render_chat_template(template: str, **variables) -> str:
    """Render a Jinja chat template in a sandbox with the helpers HF templates call.

    NOTE: transformers also defines a {% generation %} tag for assistant masks; templates
    that use it fail to compile here.
    """
    return _compile_template(template).render(**variables)


# The newline after "system" is a real newline in some templates (SmolLM2's) and a Jinja "\n" escape in others.
_CHATML_SYSTEM_LITERAL = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.DOTALL)


def default_system_prompt(template: str) -> Optional[str]:
    """Return the system prompt a ChatML template inserts when the messages have none, if any."""
    match = _CHATML_SYSTEM_LITERAL.search(template)
    if match is None:
        return None
    return match.group(1).replace("\\n", "\n").replace("\\'", "'")


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True,
                  default_system: Optional[str] = None) -> str:
    """Render messages as ChatML, like SmolLM2's template, without jinja2."""
    parts = []
    if default_system is not None and (not messages or messages[0].get("role") != "system"):
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# --------------------------------------------------------------------------- byte-level BPE


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict:
    """Map each byte to the printable character GPT-2's byte-level BPE spells it with.

    Printable Latin-1 bytes map to themselves. The other 68 bytes (controls, space,
    and a few others) map to code points 256 and up, in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        | set(range(ord("\u00ae"), ord("\u00ff") + 1))
    mapping = {}
    next_code_point = 256
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def _byte_level_pipeline(backend, split_pattern: Optional[str] = None) -> None:
    """Attach byte-level pre-tokenizer and decoder, as GPT-2-style tokenizers use."""
    from tokenizers import Regex, decoders, pre_tokenizers

    if split_pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()


def _template_post_processor(backend, bos_token: Optional[str], eos_token: Optional[str],
                             add_bos: bool, add_eos: bool) -> None:
    """Add BOS/EOS around encoded text when asked, like transformers' template post-processor."""
    from tokenizers import processors

    single, pair, special = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos and bos_token is not None and backend.token_to_id(bos_token) is not None:
        single, pair = [f"{bos_token}:0"] + single, [f"{bos_token}:0", "$A:0", f"{bos_token}:1", "$B:1"]
        special.append((bos_token, backend.token_to_id(bos_token)))
    if add_eos and eos_token is not None and backend.token_to_id(eos_token) is not None:
        single, pair = single + [f"{eos_token}:0"], pair + [f"{eos_token}:1"]
        special.append((eos_token, backend.token_to_id(eos_token)))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _gguf_list(metadata: dict, key: str, source: str, required: bool = True) -> list:
    value = metadata.get(key)
    if value is None:
        if required:
            raise CheckpointError(f"{source}: GGUF tokenizer metadata {key!r} is missing")
        return []
    if not isinstance(value, list):
        raise CheckpointError(f"{source}: GGUF tokenizer metadata {key!r} must be an array")
    return value


def _byte_level_bpe_from_gguf(metadata: dict, source: str):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"{source}: GGUF tokenizer model {model!r} is not supported; skupy builds byte-level BPE "
            "('gpt2') tokenizers from GGUF. Pass tokenizer=<folder with tokenizer.json> instead")
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", source)
    # GGUFWriter leaves out an empty merges array, so a missing one means no merges.
    merges = _gguf_list(metadata, "tokenizer.ggml.merges", source, required=False)
    token_types = _gguf_list(metadata, "tokenizer.ggml.token_type", source, required=False)

    alphabet = set(byte_to_unicode().values())
    spelling = byte_to_unicode()
    vocab = {}
    for index, token in enumerate(tokens):
        # A few converters store tokens as raw text; re-spell those in the byte alphabet.
        if not set(token) <= alphabet:
            token = "".join(spelling[byte] for byte in token.encode("utf-8"))
        vocab[token] = index
    merge_pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{source}: invalid GGUF merge {merge!r}; expected two tokens separated by a space")
        merge_pairs.append((parts[0], parts[1]))

    try:
        bpe = models.BPE(vocab=vocab, merges=merge_pairs, continuing_subword_prefix="", end_of_word_suffix="",
                         fuse_unk=False, byte_fallback=False)
    except Exception as error:  # the tokenizers library raises plain Exception
        raise CheckpointError(f"{source}: cannot build a BPE tokenizer from the GGUF vocabulary: {error}") from None
    backend = Backend(bpe)
    _byte_level_pipeline(backend, GGUF_SPLIT_PATTERNS.get(metadata.get("tokenizer.ggml.pre")))

    control, user_defined = [], []
    for token, token_type in zip(tokens, token_types):
        if token_type == GGUF_TOKEN_CONTROL and set(token) <= alphabet:
            control.append(AddedToken(token, normalized=False, special=True))
        elif token_type == GGUF_TOKEN_USER_DEFINED and token in vocab:
            user_defined.append(AddedToken(token, normalized=False, special=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user_defined)

    settings = _gguf_settings(metadata)
    _template_post_processor(backend, settings["bos_token"], settings["eos_token"],
                             settings["add_bos_token"], settings["add_eos_token"])
    return backend


def _gguf_settings(metadata: dict) -> dict:
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token_for(key):
        token_id = metadata.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            return tokens[token_id]
        return None

    return {
        "bos_token": token_for("tokenizer.ggml.bos_token_id"),
        "eos_token": token_for("tokenizer.ggml.eos_token_id"),
        "unk_token": token_for("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_for("tokenizer.ggml.padding_token_id"),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": metadata.get(f"{metadata.get('general.architecture')}.context_length"),
    }


def _byte_level_bpe_from_files(folder: Path, settings: dict):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    for name in ("vocab.json", "merges.txt"):
        size = (folder / name).stat().st_size
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise CheckpointError(f"{folder / name}: {size} bytes is more than the {MAX_TOKENIZER_FILE_BYTES}-byte limit")
    try:
        bpe = models.BPE.from_file(os.fspath(folder / "vocab.json"), os.fspath(folder / "merges.txt"))
    except Exception as error:  # the tokenizers library raises plain Exception
        raise CheckpointError(f"{folder}: invalid vocab.json or merges.txt: {error}") from None
    backend = Backend(bpe)
    _byte_level_pipeline(backend)
    special = [settings.get(name) for name in SPECIAL_TOKEN_NAMES]
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                for token in dict.fromkeys(special) if token is not None])
    _template_post_processor(backend, settings.get("bos_token"), settings.get("eos_token"),
                             settings.get("add_bos_token", False), settings.get("add_eos_token", False))
    return backend


# --------------------------------------------------------------------------- folder settings


def _token_content(value) -> Optional[str]:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _folder_settings(folder: Path) -> dict:
    """Collect Tokenizer() keyword arguments from the config files next to a tokenizer."""
    config = _read_optional_json(folder / "tokenizer_config.json")
    special_map = _read_optional_json(folder / "special_tokens_map.json")
    settings = {}
    for name in SPECIAL_TOKEN_NAMES:
        settings[name] = _token_content(config.get(name)) or _token_content(special_map.get(name))

    template = config.get("chat_template")
    if isinstance(template, list):
        # A list of named templates; "default" is the one transformers uses without a name.
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        # transformers 4.43 and later save the template in this file, and prefer it when both exist.
        template = _read_limited_text(template_file, "chat_template.jinja")
    settings["chat_template"] = template if isinstance(template, str) else None

    settings["add_bos_token"] = bool(config.get("add_bos_token", False))
    settings["add_eos_token"] = bool(config.get("add_eos_token", False))
    max_length = config.get("model_max_length")
    # transformers writes a huge placeholder when the length is unknown.
    settings["model_max_length"] = max_length if isinstance(max_length, int) and max_length < 10**9 else None
    return settings


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(_read_limited_text(path, path.name))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_limited_text(path: Path, description: str) -> str:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{description} not found: {path}")
    size = path.stat().st_size
    if size > MAX_TOKENIZER_FILE_BYTES:
        raise CheckpointError(f"{path}: {description} is {size} bytes, more than the {MAX_TOKENIZER_FILE_BYTES}-byte limit")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: {description} is not valid UTF-8: {error}") from None


def _json_text(value: dict) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


__all__ = [
    "Tokenizer",
    "byte_to_unicode",
    "default_system_prompt",
    "format_sku_prompt",
    "render_chat_template",
    "render_chatml",
]
