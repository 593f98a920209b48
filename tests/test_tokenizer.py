"""Tests for skupy.tokenizer, with transformers' tokenizers as the reference where installed."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from skupy.checkpoint import CheckpointError, CheckpointNotFoundError
from skupy.tokenizer import (
    Tokenizer,
    byte_to_unicode,
    default_system_prompt,
    format_sku_prompt,
    render_chatml,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_PER_DATASET = 200

# A ChatML template with a default system prompt, shaped like SmolLM2's.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken...?"},
     {"role": "user", "content": "Go on\nplease."}],
]


def toy_metadata(**changes) -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [byte_to_unicode()[byte] for byte in range(256)] + ["Ġt", "he", "Ġthe", "ll"]
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "l l"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    metadata.update(changes)
    return metadata


def toy_tokenizer(**changes) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(toy_metadata(**changes))


# --------------------------------------------------------------------------- prompt formats


def test_sku_prompt_with_answer():
    assert format_sku_prompt("Why?", "Because.") == "### Question: Why?\n ### Answer: Because."


def test_sku_prompt_without_answer():
    assert format_sku_prompt("Why?") == "### Question: Why?\n ### Answer:"
    assert Tokenizer.format_sku_prompt("Why?") == "### Question: Why?\n ### Answer:"


def test_chatml_fallback_matches_jinja(monkeypatch):
    pytest.importorskip("jinja2")
    tokenizer = toy_tokenizer()
    rendered = {(index, generation): tokenizer.apply_chat_template(messages, add_generation_prompt=generation)
                for index, messages in enumerate(CONVERSATIONS) for generation in (True, False)}

    monkeypatch.setitem(sys.modules, "jinja2", None)  # makes "import jinja2" raise ImportError
    for (index, generation), expected in rendered.items():
        assert tokenizer.apply_chat_template(CONVERSATIONS[index], add_generation_prompt=generation) == expected


def test_default_system_prompt_extracted():
    assert default_system_prompt(CHATML_TEMPLATE) == "You are a helpful assistant."
    assert default_system_prompt("{{ messages }}") is None
    assert render_chatml([{"role": "user", "content": "x"}], True, None) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_missing_raises():
    tokenizer = toy_tokenizer(**{"tokenizer.chat_template": None})

    with pytest.raises(ValueError, match="no chat_template"):
        tokenizer.apply_chat_template(CONVERSATIONS[0])


# --------------------------------------------------------------------------- toy vocabulary


def test_byte_alphabet_is_a_bijection():
    mapping = byte_to_unicode()

    assert len(mapping) == 256
    assert len(set(mapping.values())) == 256
    assert mapping[ord(" ")] == "Ġ"
    assert mapping[ord("A")] == "A"
    assert all(character.isprintable() for character in mapping.values())


def test_toy_encode_uses_merges():
    tokenizer = toy_tokenizer()

    ids = tokenizer.encode("hello the")

    assert [tokenizer.id_to_token(token) for token in ids] == ["he", "ll", "o", "Ġthe"]
    assert tokenizer.decode(ids) == "hello the"


def test_toy_special_tokens():
    tokenizer = toy_tokenizer()

    assert tokenizer.encode("<|im_start|>x<|im_end|>") == [1, tokenizer.token_to_id("x"), 2]
    assert tokenizer.decode([1, tokenizer.token_to_id("x"), 2]) == "x"
    assert tokenizer.decode([1, tokenizer.token_to_id("x"), 2], skip_special_tokens=False) == "<|im_start|>x<|im_end|>"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.vocab_size == 263


def test_pad_falls_back_to_eos():
    assert toy_tokenizer().pad_token_id == 2
    assert toy_tokenizer(**{"tokenizer.ggml.padding_token_id": 0}).pad_token_id == 0


def test_add_bos_token_from_metadata():
    tokenizer = toy_tokenizer(**{"tokenizer.ggml.add_bos_token": True})

    assert tokenizer.encode("x", add_special_tokens=True) == [1, tokenizer.token_to_id("x")]
    assert tokenizer.encode("x") == [tokenizer.token_to_id("x")]


def test_offsets_are_character_offsets():
    tokenizer = toy_tokenizer()
    text = "héllo the wörld"

    ids, offsets = tokenizer.encode_with_offsets(text)

    assert len(ids) == len(offsets)
    assert offsets[0] == (0, 1)
    # "é" is two byte tokens, and both carry the span of the whole character.
    assert offsets[1] == offsets[2] == (1, 2)
    distinct = list(dict.fromkeys(offsets))
    assert "".join(text[start:end] for start, end in distinct) == text


def test_encode_batch_matches_encode():
    tokenizer = toy_tokenizer()
    texts = ["hello", "the hell", ""]

    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(CheckpointError, match="'llama' is not supported"):
        toy_tokenizer(**{"tokenizer.ggml.model": "llama"})


def test_save_load_round_trip(tmp_path):
    tokenizer = toy_tokenizer(**{"tokenizer.ggml.add_bos_token": True})

    tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")

    assert loaded.encode("hello the <|im_end|>", add_special_tokens=True) == \
        tokenizer.encode("hello the <|im_end|>", add_special_tokens=True)
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.special_tokens() == tokenizer.special_tokens()
    assert loaded.add_bos_token is True
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE


def test_load_reads_chat_template_file(tmp_path):
    toy_tokenizer().save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ 'custom' }}")

    assert Tokenizer.load(tmp_path).chat_template == "{{ 'custom' }}"


def test_load_vocab_and_merges_files(tmp_path):
    tokenizer = toy_tokenizer()
    tokenizer.backend.model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": {
        "content": "<|im_end|>", "special": True}, "add_bos_token": True}))

    loaded = Tokenizer.load(tmp_path)

    assert loaded.encode("hello the") == tokenizer.encode("hello the")
    assert loaded.encode("x", add_special_tokens=True) == [1, tokenizer.token_to_id("x")]
    assert loaded.eos_token_id == 2


def test_load_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no tokenizer found"):
        Tokenizer.load(tmp_path)


def test_load_sentencepiece_only(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")

    with pytest.raises(CheckpointError, match="SentencePiece"):
        Tokenizer.load(tmp_path)


def test_load_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")

    with pytest.raises(CheckpointError, match="invalid tokenizer.json"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------------- SmolLM2 and real prompts


def data_dir() -> Path:
    return Path(os.environ.get("SKUPY_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def real_prompts() -> list:
    folder = data_dir()
    pku = folder / "pku-saferlhf" / "test.jsonl"
    truthfulqa = folder / "truthfulqa" / "TruthfulQA.csv"
    if not pku.is_file() or not truthfulqa.is_file():
        pytest.skip(f"data sets not found under {folder}; set SKUPY_DATA_DIR")
    prompts = []
    with open(pku, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            prompts += [record["prompt"], record["response_0"]]
            if len(prompts) >= PROMPTS_PER_DATASET:
                break
    with open(truthfulqa, encoding="utf-8", newline="") as handle:
        for row in list(csv.DictReader(handle))[:PROMPTS_PER_DATASET // 2]:
            prompts += [row["Question"], format_sku_prompt(row["Question"], row["Best Answer"])]
    # Text that stresses pre-tokenization: digits, whitespace runs, accents, emoji, markup.
    prompts += ["Call 555-0123 at 10:45pm!!", "  leading\tand\n\n trailing  ", "naïve café – 😀 🇫🇷",
                "<|im_start|>user\nhi<|im_end|>", "x<|endoftext|>y", "def f(x):\n    return x**2  # ok"]
    return prompts


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from skupy.gguf_io import find_packaged_gguf

    try:
        path = find_packaged_gguf()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))
    return path, Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    path, _tokenizer = smollm2_tokenizer
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_special_tokens(smollm2_tokenizer):
    _path, tokenizer = smollm2_tokenizer

    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.chat_template.startswith("{% for message in messages %}")


def test_smollm2_decode_round_trip(smollm2_tokenizer):
    _path, tokenizer = smollm2_tokenizer

    for text in real_prompts():
        if "<|" in text:
            continue  # special tokens are dropped by decode(skip_special_tokens=True)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_smollm2_offsets_cover_text(smollm2_tokenizer):
    _path, tokenizer = smollm2_tokenizer

    for text in real_prompts()[:50]:
        ids, offsets = tokenizer.encode_with_offsets(text)
        assert len(ids) == len(offsets)
        assert all(0 <= start <= end <= len(text) for start, end in offsets)
        assert offsets == sorted(offsets)


def test_smollm2_chatml_fallback_matches_jinja(smollm2_tokenizer, monkeypatch):
    pytest.importorskip("jinja2")
    _path, tokenizer = smollm2_tokenizer
    expected = [tokenizer.apply_chat_template(messages) for messages in CONVERSATIONS]

    monkeypatch.setitem(sys.modules, "jinja2", None)

    assert [tokenizer.apply_chat_template(messages) for messages in CONVERSATIONS] == expected


@pytest.mark.oracle
def test_smollm2_ids_match_transformers(smollm2_tokenizer, reference_tokenizer):
    _path, tokenizer = smollm2_tokenizer
    prompts = real_prompts()

    ours = tokenizer.encode_batch(prompts)

    for text, ids in zip(prompts, ours):
        assert ids == reference_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids) == reference_tokenizer.decode(ids, skip_special_tokens=True), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference_tokenizer.decode(ids), text
    assert tokenizer.encode("hi", add_special_tokens=True) == reference_tokenizer.encode("hi")


@pytest.mark.oracle
def test_smollm2_chat_template_matches_transformers(smollm2_tokenizer, reference_tokenizer):
    _path, tokenizer = smollm2_tokenizer

    for messages in CONVERSATIONS:
        for generation in (True, False):
            expected = reference_tokenizer.apply_chat_template(messages, tokenize=False,
                                                               add_generation_prompt=generation)
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation) == expected


@pytest.mark.oracle
def test_smollm2_saved_tokenizer_loads_in_transformers(smollm2_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    _path, tokenizer = smollm2_tokenizer
    tokenizer.save(tmp_path)

    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reloaded = Tokenizer.load(tmp_path)

    for text in real_prompts()[:60]:
        assert reference.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
        assert reloaded.encode(text) == tokenizer.encode(text), text
    assert reference.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.oracle
def test_vocab_merges_folder_matches_transformers(smollm2_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    _path, tokenizer = smollm2_tokenizer
    tokenizer.backend.model.save(str(tmp_path))

    reference = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    loaded = Tokenizer.load(tmp_path)

    for text in real_prompts():
        if "<|" in text:
            continue  # the two files carry no added tokens, so special tokens differ by design
        assert loaded.encode(text) == reference.encode(text, add_special_tokens=False), text
