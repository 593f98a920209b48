"""SmolLM2-135M-Instruct from the packaged GGUF: skupy against transformers on real prompts.

transformers loads the same GGUF file (from_pretrained(..., gguf_file=...)), so
both sides start from identical dequantized weights.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import skupy  # noqa: E402
from skupy.hf_io import load_hf  # noqa: E402

from .helpers import data_dir_or_skip  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

LOGITS_TOLERANCE = 1e-3  # relative to the largest logit magnitude of each prompt


@pytest.fixture(scope="module")
def models():
    from skupy.gguf_io import find_packaged_gguf

    try:
        path = find_packaged_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ours = skupy.load(str(path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               torch_dtype=torch.float32).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def prompts():
    import json

    root = data_dir_or_skip()
    lines = (root / "pku-saferlhf" / "test.jsonl").read_text().splitlines()[:2]
    texts = [json.loads(line)["prompt"] for line in lines]
    return texts + ["What is the capital of France?", "Explain photosynthesis in one sentence."]


def chat_ids(model, text):
    tokenizer = model.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_logits_match_transformers_on_real_prompts(models, prompts):
    ours, theirs = models
    for text in prompts:
        ids = chat_ids(ours, text)
        logits = ours.forward([ids])[0]
        with torch.no_grad():
            expected = theirs(torch.tensor([ids])).logits[0].numpy()
        error = np.abs(logits - expected).max() / np.abs(expected).max()
        assert error < LOGITS_TOLERANCE, f"{text[:40]!r}: relative logit error {error:.2e}"


def test_greedy_generation_is_token_identical(models, prompts):
    ours, theirs = models
    all_ids = [chat_ids(ours, text) for text in prompts]
    generated = ours.generate_ids(all_ids, 24)
    for ids, tokens in zip(all_ids, generated):
        # The chat template contains <|im_end|>, which is also the pad id: without an explicit
        # attention mask transformers would treat those prompt tokens as padding.
        with torch.no_grad():
            output = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=24, do_sample=False, eos_token_id=None,
                                     pad_token_id=ours.tokenizer.pad_token_id)
        assert tokens == output[0, len(ids):].tolist()


def test_batched_greedy_equals_unbatched(models, prompts):
    ours, _ = models
    all_ids = [chat_ids(ours, text) for text in prompts]
    batched = ours.generate_ids(all_ids, 16)
    for ids, tokens in zip(all_ids, batched):
        assert ours.generate_ids([ids], 16)[0] == tokens


def test_generate_answers_capital_question(models):
    ours, _ = models
    assert "Paris" in ours.generate("What is the capital of France?", 24)


def test_save_round_trip_gives_same_logits(models, tmp_path):
    ours, _ = models
    ids = chat_ids(ours, "What is the capital of France?")
    expected = ours.forward([ids])
    ours.save(tmp_path / "hf")

    _, params = load_hf(tmp_path / "hf")
    reloaded = skupy.Model(ours.config, params)
    np.testing.assert_array_equal(reloaded.forward([ids]), expected)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = theirs(torch.tensor([ids])).logits.numpy()
    assert np.abs(logits - expected).max() / np.abs(expected).max() < LOGITS_TOLERANCE


def test_cli_generate_prints_answer(capsys):
    from skupy.cli import main

    assert main(["generate", "--max-new-tokens", "16", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
