"""Whole-model oracle tests: skupy against transformers on tiny random models.

Each architecture is built in transformers with random weights, saved as an
HF folder, loaded by skupy, and compared on logits, a weighted cross-entropy
loss and the gradient of every parameter. Tolerance: 1e-4 relative to the
largest magnitude of each compared tensor.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from skupy.hf_io import load_hf, to_hf_state_dict  # noqa: E402
from skupy.model import Model  # noqa: E402

RELATIVE_TOLERANCE = 1e-4
VOCAB = 97


def llama_config(**changes):
    values = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5)
    values.update(changes)
    return transformers.LlamaConfig(**values)


def gpt2_config(**changes):
    values = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0)
    values.update(changes)
    return transformers.GPT2Config(**values)


def opt_config(**changes):
    values = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, ffn_dim=80, num_attention_heads=4,
                  max_position_embeddings=64, word_embed_proj_dim=48, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, layerdrop=0.0, do_layer_norm_before=True, pad_token_id=1)
    values.update(changes)
    return transformers.OPTConfig(**values)


CASES = {
    "llama-gqa-untied": (transformers.LlamaForCausalLM, lambda: llama_config()),
    "llama-mqa-tied": (transformers.LlamaForCausalLM, lambda: llama_config(num_key_value_heads=1,
                                                                             tie_word_embeddings=True)),
    "llama-rope-scaling": (transformers.LlamaForCausalLM, lambda: llama_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "gpt2": (transformers.GPT2LMHeadModel, lambda: gpt2_config()),
    "opt-pre-norm": (transformers.OPTForCausalLM, lambda: opt_config()),
    "opt-post-norm-projection": (transformers.OPTForCausalLM,
                                 lambda: opt_config(do_layer_norm_before=False, word_embed_proj_dim=32)),
}


def randomize(hf_model, seed):
    """Give every parameter O(1)-scale random values so the comparison is not dominated by tiny logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name or "ln_" in name or "layer_norm" in name:
                parameter.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                parameter.copy_(0.15 * noise)


def relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model_class, make_config = CASES[request.param]
    torch.manual_seed(0)
    hf_model = model_class(make_config()).float().eval()
    randomize(hf_model, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder, safe_serialization=True)
    config, params = load_hf(folder)
    return request.param, hf_model, Model(config, params)


def batch(seed=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, size=(3, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 8:] = 0  # right padding on row 1
    mask[2, 5:] = 0
    targets = rng.integers(0, VOCAB, size=tokens.shape).astype(np.int32)
    weights = rng.random(tokens.shape).astype(np.float32) * mask
    weights[0, :4] = 0.0  # question positions carry no loss
    return tokens, mask, targets, weights


def hf_loss(hf_model, tokens, mask, targets, weights):
    logits = hf_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
    return logits, (nll * torch.tensor(weights)).sum()


def test_logits_match_transformers(pair):
    name, hf_model, model = pair
    tokens, mask, _, _ = batch()
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = model.forward(tokens, mask)
    real = mask.astype(bool)
    assert relative_error(logits[real], expected[real]) < RELATIVE_TOLERANCE, name


def test_loss_and_gradients_match_transformers(pair):
    name, hf_model, model = pair
    tokens, mask, targets, weights = batch(seed=4)

    hf_model.zero_grad()
    _, expected_loss = hf_loss(hf_model, tokens, mask, targets, weights)
    expected_loss.backward()

    model.zero_grad()
    loss = model.accumulate_ce(tokens, targets, weights, mask)
    assert abs(loss - expected_loss.item()) <= RELATIVE_TOLERANCE * abs(expected_loss.item())

    # skupy gradients in the HF layout: fusing and transposing are linear, so they map gradients too
    grads_as_hf = to_hf_state_dict(model.config, model.grads)
    # The k_proj bias gradient is zero in exact arithmetic (it shifts a whole softmax row), so
    # each error is taken relative to at least 1e-3 of the largest gradient in the model.
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in hf_model.parameters())
    checked = 0
    for hf_name, parameter in hf_model.named_parameters():
        assert hf_name in grads_as_hf, f"{name}: no skupy gradient for {hf_name}"
        expected = parameter.grad.numpy()
        actual = np.asarray(grads_as_hf[hf_name])
        error = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), floor))
        assert error < RELATIVE_TOLERANCE, f"{name}: gradient of {hf_name} differs by {error:.2e}"
        checked += 1
    assert checked == len(list(hf_model.parameters()))


def test_recompute_gives_identical_gradients(pair):
    name, _, model = pair
    tokens, mask, targets, weights = batch(seed=5)
    model.zero_grad()
    model.accumulate_ce(tokens, targets, weights, mask)
    stored = {key: value.copy() for key, value in model.grads.items()}

    recomputing = Model(model.config, model.params, recompute=True)
    recomputing.accumulate_ce(tokens, targets, weights, mask)
    for key, value in stored.items():
        assert np.array_equal(recomputing.grads[key], value), f"{name}: {key}"


def test_greedy_generation_matches_transformers(pair):
    name, hf_model, model = pair
    rng = np.random.default_rng(6)
    prompts = [rng.integers(2, VOCAB, size=n).tolist() for n in (4, 7)]
    ours = model.generate_ids(prompts, 8)
    for prompt, generated in zip(prompts, ours):
        with torch.no_grad():
            output = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                       pad_token_id=0, eos_token_id=None)
        assert output[0, len(prompt):].tolist() == generated, name


def test_adamw_steps_match_torch(pair):
    name, hf_model, model = pair
    if not name.startswith("llama-gqa"):
        pytest.skip("one architecture is enough for the optimizer comparison")
    from skupy.optim import AdamW

    tokens, mask, targets, weights = batch(seed=7)
    params = {key: value.copy() for key, value in model.params.items()}
    ours = Model(model.config, params)
    optimizer = AdamW(ours.params, lr=1e-2, weight_decay=0.1)
    hf_copy = type(hf_model)(hf_model.config).float().eval()
    hf_copy.load_state_dict(hf_model.state_dict())
    reference = torch.optim.AdamW(hf_copy.parameters(), lr=1e-2, weight_decay=0.1)

    losses = []
    for _ in range(4):
        ours.zero_grad()
        losses.append(ours.accumulate_ce(tokens, targets, weights, mask))
        optimizer.step(ours.grads)
        reference.zero_grad()
        _, loss = hf_loss(hf_copy, tokens, mask, targets, weights)
        loss.backward()
        reference.step()
    assert losses[-1] < losses[0]
    updated = to_hf_state_dict(ours.config, ours.params)
    for hf_name, parameter in hf_copy.named_parameters():
        error = relative_error(np.asarray(updated[hf_name]), parameter.detach().numpy())
        assert error < 1e-4, f"{hf_name} after 4 AdamW steps differs by {error:.2e}"
