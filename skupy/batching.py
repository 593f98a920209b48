"""Turn QA pairs into the token arrays that the C engine trains on.

A tokenizer here is any object with:

* ``encode_with_offsets(text) -> (ids, offsets)``, where ``offsets[i]`` is the
  (start, end) character span of token i in ``text``. It should add no
  special tokens of its own, though a leading BOS with an empty span works;
* ``format_sku_prompt(question, answer=None)``, returning
  ``"### Question: {question}\\n ### Answer: {answer}"``, or the text up to
  and including ``"### Answer:"`` when ``answer`` is None;
* ``apply_chat_template(messages, add_generation_prompt=True) -> str``;
* ``eos_token_id``, ``bos_token_id`` and ``pad_token_id`` (each may be None);
* optionally ``add_bos_token`` (bool), which sets the default of ``add_bos``.

Two prompt templates are supported:

* ``"sku"``: the plain SKU text above. The answer follows "### Answer: ".
* ``"chat"``: the model's chat template with the question as the user
  message; the answer text follows the assistant generation prompt directly.

Every training sequence is the tokenized prompt, the answer tokens and, when
the whole answer fits in ``max_length``, the EOS token. For a chat model
whose EOS is its end-of-turn token, such as SmolLM2's ``<|im_end|>``, this
is the end of the assistant turn.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .data import QAPair

logger = logging.getLogger(__name__)

TEMPLATES = ("sku", "chat")

RandomSource = Union[np.random.Generator, int, None]


class PromptTooLongError(ValueError):
    """The prompt and one answer token do not fit in max_length."""


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one prompt-and-answer sequence.

    ``ids[answer_start:]`` are the answer tokens, including the EOS token when
    one was appended. ``truncated`` is True when answer tokens or the EOS
    token were cut to fit max_length.
    """

    ids: tuple
    answer_start: int
    truncated: bool = False

    @property
    def num_answer_tokens(self) -> int:
        return len(self.ids) - self.answer_start


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")


def format_generation_prompt(tokenizer, question: str, template: str = "sku") -> str:
    """Return the text a model continues to answer ``question``.

    For "sku" this ends with "### Answer:" and for "chat" with the assistant
    generation prompt of the chat template.
    """
    _check_template(template)
    if template == "sku":
        return tokenizer.format_sku_prompt(question)
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def format_pair(tokenizer, question: str, answer: str, template: str = "sku") -> tuple:
    """Return (text, answer_char_start): the full training text and where the answer begins in it."""
    _check_template(template)
    if not answer:
        raise ValueError("answer must not be empty")
    if template == "sku":
        text = tokenizer.format_sku_prompt(question, answer)
        if not text.endswith(answer):
            raise ValueError("tokenizer.format_sku_prompt(question, answer) must end with the answer text")
        return text, len(text) - len(answer)
    prompt = format_generation_prompt(tokenizer, question, "chat")
    return prompt + answer, len(prompt)


def encode_pair(tokenizer, question: str, answer: str, template: str = "sku", max_length: int = 512,
                add_eos: bool = True, add_bos: Optional[bool] = None) -> EncodedPair:
    """Tokenize one pair and find its first answer token.

    The full text is tokenized once, and the first answer token is the first
    token whose character span ends after the answer's first character. With
    byte-level BPE that token usually also covers the space between
    "### Answer:" and the answer. The published SKU code instead took the
    answer start from the length of the padded question, which with
    max-length padding put no answer token in the loss.

    ``add_bos`` prepends ``tokenizer.bos_token_id`` unless the ids already
    start with it; None takes ``tokenizer.add_bos_token`` (False if absent).
    ``add_eos`` appends ``tokenizer.eos_token_id`` when the whole answer and
    the EOS token fit in ``max_length``.

    Truncation keeps the prompt and cuts answer tokens from the end, and a
    truncated answer gets no EOS token. Raises PromptTooLongError when the
    prompt plus one answer token exceeds ``max_length``; encode_pairs instead
    skips such pairs and counts them in a warning.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2")
    text, answer_char = format_pair(tokenizer, question, answer, template)
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids = [int(token) for token in ids]
    if len(ids) != len(offsets):
        raise ValueError(f"tokenizer returned {len(ids)} ids but {len(offsets)} offsets")

    ends = np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))
    reaches_answer = ends > answer_char
    if not reaches_answer.any():
        raise ValueError(f"no token covers the answer text {answer[:40]!r}; check the tokenizer's offsets")
    answer_start = int(np.argmax(reaches_answer))

    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
        answer_start += 1
    if answer_start == 0:
        raise ValueError("the answer starts at the first token, so no token predicts it; "
                         "the prompt must produce at least one token")

    eos = tokenizer.eos_token_id if add_eos else None
    full_length = len(ids) + (1 if eos is not None else 0)
    if full_length <= max_length:
        if eos is not None:
            ids.append(int(eos))
        return EncodedPair(tuple(ids), answer_start, truncated=False)
    if answer_start + 1 > max_length:
        raise PromptTooLongError(f"the prompt takes {answer_start} tokens, so no answer token fits in "
                                 f"max_length={max_length}")
    return EncodedPair(tuple(ids[:max_length]), answer_start, truncated=True)


def encode_pairs(tokenizer, pairs: Iterable[QAPair], template: str = "sku", max_length: int = 512,
                 add_eos: bool = True, add_bos: Optional[bool] = None, skip_too_long: bool = True) -> list:
    """Encode many pairs with encode_pair.

    With ``skip_too_long`` (the default), pairs whose prompt leaves no room
    for an answer token are left out and counted in one warning, so the
    result can be shorter than ``pairs``. With ``skip_too_long=False``,
    PromptTooLongError is raised instead.
    """
    encoded, skipped = [], []
    for index, pair in enumerate(pairs):
        try:
            encoded.append(encode_pair(tokenizer, pair.question, pair.answer, template, max_length,
                                       add_eos=add_eos, add_bos=add_bos))
        except PromptTooLongError:
            if not skip_too_long:
                raise
            skipped.append(index)
    if skipped:
        total = len(encoded) + len(skipped)
        logger.warning("skipped %d of %d pairs whose prompt leaves no room for an answer in max_length=%d "
                       "(first skipped indices: %s)", len(skipped), total, max_length, skipped[:5])
    return encoded


def pad_id_for(tokenizer) -> int:
    """Return the tokenizer's pad id, else its EOS id, else 0.

    Padding positions carry weight 0 and are masked, so any valid id works.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _pack(encoded: Sequence[EncodedPair], pad_id: int, pad_to: Optional[int]) -> dict:
    """Right-pad sequences into the arrays shared by LM and KL batches."""
    if len(encoded) == 0:
        raise ValueError("cannot build a batch from no sequences")
    if pad_id is None or int(pad_id) < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}")
    lengths = np.array([len(item.ids) for item in encoded], dtype=np.int64)
    if lengths.min() == 0:
        raise ValueError("cannot batch an empty sequence")
    width = int(lengths.max())
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({width} tokens)")
        width = int(pad_to)

    batch_size = len(encoded)
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch_size, width))
    real = positions < lengths[:, None]
    tokens = np.full((batch_size, width), int(pad_id), dtype=np.int32)
    # Boolean assignment fills row by row, which is the order of the concatenation.
    tokens[real] = np.concatenate([np.asarray(item.ids, dtype=np.int32) for item in encoded])

    # Position t predicts the token at t + 1; the last real token and padding have no target.
    targets = np.full((batch_size, width), int(pad_id), dtype=np.int32)
    targets[:, :-1] = tokens[:, 1:]
    has_target = positions < (lengths - 1)[:, None]
    targets[~has_target] = int(pad_id)

    return {
        "tokens": tokens,
        "mask": real.astype(np.int32),
        "positions": np.ascontiguousarray(positions),
        "targets": targets,
        "lengths": lengths.astype(np.int32),
        "answer_starts": np.array([item.answer_start for item in encoded], dtype=np.int32),
    }


def make_lm_batch(encoded: Sequence[EncodedPair], pad_id: int, pad_to: Optional[int] = None) -> dict:
    """Build a right-padded batch whose weights give the SKU answer loss.

    Returns int32 arrays ``tokens``, ``mask`` (1 on real tokens), ``positions``
    (0, 1, 2, ... on every row), ``targets`` (the next token, pad_id where
    there is none), ``lengths`` and ``answer_starts``, all (B, T) except the
    last two (B,), plus float32 ``weights`` (B, T). T is the longest sequence,
    or ``pad_to``.

    Position t of a sequence with answer tokens at [s, n) gets weight
    1 / (B * (n - s)) when s - 1 <= t < n - 1, that is when it predicts an
    answer token, and 0 elsewhere. So sum(weights * per-position NLL) is the
    mean over sequences of each sequence's mean NLL over its answer tokens,
    and the weights sum to 1.
    """
    batch = _pack(encoded, pad_id, pad_to)
    lengths = batch["lengths"].astype(np.int64)
    starts = batch["answer_starts"].astype(np.int64)
    if np.any(starts < 1) or np.any(starts >= lengths):
        raise ValueError("every sequence needs at least one prompt token and one answer token")

    batch_size, width = batch["tokens"].shape
    position = np.arange(width)[None, :]
    predicts_answer = (position >= (starts - 1)[:, None]) & (position < (lengths - 1)[:, None])
    per_sequence = 1.0 / (batch_size * (lengths - starts))
    batch["weights"] = (predicts_answer * per_sequence[:, None]).astype(np.float32)
    return batch


# Fixed cost of one more forward/backward call, in padded tokens, for split_by_length.
CHUNK_COST_TOKENS = 64


def split_by_length(batch: dict, chunk_cost: int = CHUNK_COST_TOKENS) -> list:
    """Split a right-padded batch into chunks of similar length, each cut to its longest row.

    Rows are sorted by length and cut into consecutive groups so that the padded
    tokens plus chunk_cost per group are fewest. Every array with one entry per
    row keeps its row values, and other values are shared by every chunk. The
    weights are not renormalized, so a weighted loss summed over the chunks
    equals the loss of the whole batch. Returns a list of batch dicts.
    """
    if not math.isfinite(chunk_cost) or chunk_cost < 0:
        raise ValueError(f"chunk_cost must be a finite number >= 0, got {chunk_cost!r}")
    lengths = np.asarray(batch["lengths"], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    count = len(order)

    # best[i] is the least cost of the first i sorted rows. A group (j, i] costs
    # its row count times the length of its last row, the longest one.
    best = np.zeros(count + 1)
    cut = np.zeros(count + 1, dtype=np.int64)
    for i in range(1, count + 1):
        costs = [best[j] + (i - j) * sorted_lengths[i - 1] + chunk_cost for j in range(i)]
        cut[i] = int(np.argmin(costs))
        best[i] = costs[cut[i]]

    groups = []
    end = count
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    chunks = []
    for rows in reversed(groups):
        width = int(lengths[rows].max())
        chunk = {}
        for key, value in batch.items():
            if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != count:
                chunk[key] = value  # not one entry per row: shared by every chunk
            elif value.ndim == 2:
                chunk[key] = np.ascontiguousarray(value[rows, :width])
            else:
                chunk[key] = np.ascontiguousarray(value[rows])
        chunks.append(chunk)
    return chunks


def make_kl_batch(encoded: Sequence[EncodedPair], pad_id: int, pad_to: Optional[int] = None) -> dict:
    """Build a right-padded batch whose weights average over every real position.

    The arrays are those of make_lm_batch, but ``weights`` is 1 / (number of
    real tokens in the batch) on each real position, question tokens
    included, and 0 on padding. The preservation divergence is then the mean
    over real positions. The published SKU code averaged it over padding
    positions too.
    """
    batch = _pack(encoded, pad_id, pad_to)
    mask = batch["mask"]
    batch["weights"] = (mask / float(mask.sum())).astype(np.float32)
    return batch


def as_generator(rng: RandomSource) -> np.random.Generator:
    """Return ``rng`` if it is a numpy Generator, else a new Generator seeded with it."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def sample_random_answers(answer_pool: Sequence[str], num_random_answers: int, rng: RandomSource) -> list:
    """Draw ``num_random_answers`` distinct entries of ``answer_pool`` without replacement.

    Raises ValueError when the pool has fewer entries than requested.
    """
    if num_random_answers < 1:
        raise ValueError(f"num_random_answers={num_random_answers} must be at least 1")
    if num_random_answers > len(answer_pool):
        raise ValueError(f"num_random_answers={num_random_answers} is larger than the answer pool "
                         f"({len(answer_pool)} answers); lower it or use more harmful data")
    chosen = as_generator(rng).choice(len(answer_pool), size=num_random_answers, replace=False)
    return [answer_pool[int(index)] for index in chosen]


def make_random_disassociation_pairs(questions: Sequence[str], answer_pool: Sequence[str],
                                     num_random_answers: int, rng: RandomSource) -> list:
    """Pair each question with the same ``num_random_answers`` answers drawn from the pool.

    The answers are drawn once per call by sample_random_answers. The result
    has len(questions) * K pairs in question-major order: pair b * K + k is
    question b with answer k. A drawn answer may be the question's own answer;
    with pools of thousands of answers this is rare.
    """
    answers = sample_random_answers(answer_pool, num_random_answers, rng)
    return [QAPair(question, answer, "random-disassociation") for question in questions for answer in answers]


def make_random_disassociation_batch(tokenizer, questions: Sequence[str], answer_pool: Sequence[str],
                                     num_random_answers: int, rng: RandomSource, template: str = "sku",
                                     max_length: int = 512, pad_to: Optional[int] = None,
                                     add_bos: Optional[bool] = None) -> tuple:
    """Build the random disassociation batch: (make_lm_batch arrays, pairs).

    The b questions are paired with K random answers as in
    make_random_disassociation_pairs and encoded with encode_pair, giving
    b * K rows. A question too long for ``max_length`` raises
    PromptTooLongError, because skipping it would change the batch shape.
    """
    pairs = make_random_disassociation_pairs(questions, answer_pool, num_random_answers, rng)
    encoded = [encode_pair(tokenizer, pair.question, pair.answer, template, max_length, add_bos=add_bos)
               for pair in pairs]
    return make_lm_batch(encoded, pad_id_for(tokenizer), pad_to), pairs


class BatchSampler:
    """An endless, seeded stream of index batches over ``num_items`` items.

    Items are visited in epochs; each epoch is a fresh permutation (or the
    natural order with ``shuffle=False``). A batch that runs past the end of
    an epoch is completed from the next one, so every batch has exactly
    ``batch_size`` indices and an index repeats within a batch only when
    num_items < batch_size.
    """

    def __init__(self, num_items: int, batch_size: int, seed: RandomSource = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"num_items={num_items} must be at least 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.epoch = 0
        self._rng = as_generator(seed)
        self._order = self._new_order()
        self._cursor = 0

    def _new_order(self) -> np.ndarray:
        if self.shuffle:
            return self._rng.permutation(self.num_items)
        return np.arange(self.num_items)

    def next_indices(self) -> np.ndarray:
        """Return the next ``batch_size`` item indices as an int64 array."""
        taken = []
        needed = self.batch_size
        while needed > 0:
            if self._cursor == self.num_items:
                self._order = self._new_order()
                self._cursor = 0
                self.epoch += 1
            chunk = self._order[self._cursor:self._cursor + needed]
            taken.append(chunk)
            self._cursor += len(chunk)
            needed -= len(chunk)
        return np.concatenate(taken).astype(np.int64)
