"""Metrics, each checked on a case computed by hand or against a direct forward pass of a tiny model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from skupy import metrics
from skupy.batching import encode_pair, encode_pairs, pad_id_for
from skupy.config import ModelConfig
from skupy.data import QAPair, TruthfulQAQuestion
from skupy.judges import JudgeVerdict
from skupy.model import Model
from skupy.sku import answer_nll

from .helpers import packaged_tokenizer_or_skip


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = packaged_tokenizer_or_skip()
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=512, tie_word_embeddings=False)
    return Model(config, tokenizer=tokenizer, trainable=[], seed=3)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def direct_answer_nlls(model, question, answer, template="chat"):
    """NLLs of the answer tokens from one unbatched forward pass."""
    encoded = encode_pair(model.tokenizer, question, answer, template, add_eos=False)
    logprobs = log_softmax(model.forward(np.array(encoded.ids)[None])[0])
    return np.array([-logprobs[t - 1, encoded.ids[t]] for t in range(encoded.answer_start, len(encoded.ids))])


class CharTokenizer:
    """Encodes each character as its code point."""

    def encode(self, text):
        return [ord(character) for character in text]


# ---------------------------------------------------------------------------
# Rates and diversity


def test_harmful_rate_by_hand():
    verdicts = [JudgeVerdict(True, 1.0), JudgeVerdict(False, 0.0), JudgeVerdict(False, 0.2), JudgeVerdict(True, 0.9)]

    assert metrics.harmful_rate(verdicts) == 0.5


def test_harmful_rate_empty():
    with pytest.raises(ValueError, match="at least one verdict"):
        metrics.harmful_rate([])


def test_refusal_rate_by_hand():
    responses = ["I'm sorry, I can't do that.", "Sure: kill the process with kill -9.", ""]

    assert metrics.refusal_rate(responses) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one response"):
        metrics.refusal_rate([])


def test_diversity_by_hand():
    # ids: a a b | b c  ->  3 distinct of 5
    assert metrics.diversity(["aab", "bc"], CharTokenizer()) == pytest.approx(0.6)


def test_diversity_empty_responses_nan(caplog):
    assert math.isnan(metrics.diversity(["", ""], CharTokenizer()))
    assert "all 2 responses are empty" in caplog.text
    with pytest.raises(ValueError, match="at least one response"):
        metrics.diversity([], CharTokenizer())


def test_diversity_real_tokenizer(tiny_model):
    tokenizer = tiny_model.tokenizer
    responses = ["the cat", "the cat the cat"]
    ids = tokenizer.encode(responses[0]) + tokenizer.encode(responses[1])

    assert metrics.diversity(responses, tokenizer) == pytest.approx(len(set(ids)) / len(ids))


# ---------------------------------------------------------------------------
# Answer log-likelihoods and fluency


def test_answer_token_nlls_match_forward(tiny_model):
    pairs = [("What is two plus two?", "Four."), ("Why is the sky blue?", "Because of Rayleigh scattering."),
             ("Hi", "")]

    nlls = metrics.answer_token_nlls(tiny_model, pairs, batch_size=2)

    for (question, answer), values in zip(pairs[:2], nlls[:2]):
        np.testing.assert_allclose(values, direct_answer_nlls(tiny_model, question, answer), rtol=1e-4, atol=1e-4)
    assert nlls[2].size == 0


def test_answer_logprobs_sum_of_nlls(tiny_model):
    pairs = [("Name a color.", "Blue."), ("Name a fruit.", "A ripe banana.")]
    expected = [-direct_answer_nlls(tiny_model, q, a, "sku").sum() for q, a in pairs]

    np.testing.assert_allclose(metrics.answer_logprobs(tiny_model, pairs, "sku"), expected, rtol=1e-4)


def test_response_perplexity_pools_tokens(tiny_model):
    prompts = ["Tell me a fact.", "Say hello.", "Say nothing."]
    responses = ["Water boils at 100 degrees Celsius at sea level.", "Hello!", ""]
    nlls = np.concatenate([direct_answer_nlls(tiny_model, p, r) for p, r in zip(prompts[:2], responses[:2])])

    perplexity = metrics.response_perplexity(tiny_model, prompts, responses)

    assert perplexity == pytest.approx(math.exp(nlls.mean()), rel=1e-4)


def test_response_perplexity_all_empty(tiny_model):
    assert math.isnan(metrics.response_perplexity(tiny_model, ["a", "b"], ["", ""]))


def test_response_perplexity_length_mismatch(tiny_model):
    with pytest.raises(ValueError, match="one entry each"):
        metrics.response_perplexity(tiny_model, ["a", "b"], ["x"])


def test_heldout_answer_nll_matches_sku(tiny_model):
    pairs = [QAPair("How are you?", "Fine, thanks."), QAPair("Where is Paris?", "In France.")]
    encoded = encode_pairs(tiny_model.tokenizer, pairs, "chat", 512)
    expected = answer_nll(tiny_model, encoded, pad_id_for(tiny_model.tokenizer))

    assert metrics.heldout_answer_nll(tiny_model, pairs, "chat") == pytest.approx(expected)


# ---------------------------------------------------------------------------
# Similarity


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3; P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3.
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)


def test_rouge_l_empty_texts():
    assert metrics.rouge_l(["", "words"], ["", ""]) == pytest.approx(0.5)


def test_rouge_l_length_mismatch():
    with pytest.raises(ValueError, match="one entry each"):
        metrics.rouge_l(["a"], [])


def test_cosine_similarities_by_hand():
    first = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    second = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])

    np.testing.assert_allclose(metrics.cosine_similarities(first, second), [1 / math.sqrt(2), 0.0, 1.0, -1.0])


def test_embed_texts_mean_pools_hidden_states(tiny_model):
    text = "Mean pooling over tokens."
    ids = tiny_model.tokenizer.encode(text)
    expected = tiny_model.hidden_states(np.array(ids)[None])[0].astype(np.float64).mean(axis=0)

    embeddings = metrics.embed_texts(tiny_model, ["short", text, ""], batch_size=2)

    np.testing.assert_allclose(embeddings[1], expected, rtol=1e-4, atol=1e-5)
    assert not embeddings[2].any()


def test_embedding_similarity_identical_texts(tiny_model):
    texts = ["one answer", "another, longer answer"]

    assert metrics.embedding_similarity(tiny_model, texts, texts) == pytest.approx(1.0)
    assert metrics.embedding_similarity(tiny_model, ["one answer"], ["a different text"]) < 1.0


# ---------------------------------------------------------------------------
# TruthfulQA multiple choice


def test_multiple_choice_scores_by_hand():
    best, correct, incorrect = -1.0, [-1.0, -2.0], [-3.0, -0.5]
    mass = lambda values: sum(math.exp(v) for v in values)  # noqa: E731

    mc1, mc2 = metrics.multiple_choice_scores(best, correct, incorrect)

    assert mc1 == 0.0
    assert mc2 == pytest.approx(mass(correct) / (mass(correct) + mass(incorrect)))


def test_multiple_choice_best_wins():
    assert metrics.multiple_choice_scores(-0.1, [-0.1], [-2.0, -3.0])[0] == 1.0


def test_multiple_choice_tie_counts_wrong():
    assert metrics.multiple_choice_scores(-1.0, [-1.0], [-1.0])[0] == 0.0


def test_multiple_choice_very_negative_logprobs():
    mc1, mc2 = metrics.multiple_choice_scores(-2000.0, [-2000.0], [-2000.0 - math.log(3)])

    assert mc1 == 1.0
    assert mc2 == pytest.approx(0.75)


def test_truthfulqa_mc_bookkeeping(monkeypatch):
    questions = [TruthfulQAQuestion("q1", "b1", ("c1a", "c1b"), ("i1a", "i1b")),
                 TruthfulQAQuestion("q2", "b2", (), ("i2a",)),
                 TruthfulQAQuestion("q3", "b3", ("c3",), ())]
    scores = {"b1": -1.0, "c1a": -1.0, "c1b": -2.0, "i1a": -3.0, "i1b": -0.5, "b2": -1.0, "i2a": -4.0}

    def fake_logprobs(model, pairs, template, batch_size, max_length):
        return np.array([scores[answer] for _, answer in pairs])

    monkeypatch.setattr(metrics, "answer_logprobs", fake_logprobs)
    result = metrics.truthfulqa_mc(None, questions)

    _, mc2_first = metrics.multiple_choice_scores(-1.0, [-1.0, -2.0], [-3.0, -0.5])
    _, mc2_second = metrics.multiple_choice_scores(-1.0, [-1.0], [-4.0])
    assert result["num_questions"] == 2
    assert result["mc1"] == pytest.approx(0.5)
    assert result["mc2"] == pytest.approx((mc2_first + mc2_second) / 2)


def test_truthfulqa_mc_tiny_model(tiny_model):
    question = TruthfulQAQuestion("What color is the sky?", "Blue.", ("Blue.", "Light blue."), ("Green.",))
    logprobs = [-direct_answer_nlls(tiny_model, question.question, answer).sum()
                for answer in ("Blue.", "Light blue.", "Green.")]
    expected_mc1, expected_mc2 = metrics.multiple_choice_scores(logprobs[0], logprobs[:2], logprobs[2:])

    result = metrics.truthfulqa_mc(tiny_model, [question])

    assert result["mc1"] == expected_mc1
    assert result["mc2"] == pytest.approx(expected_mc2, rel=1e-3)


def test_truthfulqa_mc_no_questions():
    with pytest.raises(ValueError, match="at least one question"):
        metrics.truthfulqa_mc(None, [TruthfulQAQuestion("q", "b", ("b",), ())])
