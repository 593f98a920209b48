"""skupy's C engine under Python threads.

The engine releases the GIL while it computes, so separate models must run in
parallel and give the results they give one after the other. One Engine shared
by two threads must raise RuntimeError in the thread that comes second, never
compute on buffers the first thread is using. The shared-engine tests park one
thread inside a call on purpose (while the engine iterates over a parameter
list that waits on an event), so they do not depend on timing.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from skupy import _core
from skupy.config import ModelConfig
from skupy.model import Model, init_params

# Seconds a test waits for a thread before calling the run a hang.
JOIN_SECONDS = 120


def make_model(seed: int, vocab_size: int = 64, **changes) -> Model:
    values = dict(arch="llama", vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False)
    values.update(changes)
    config = ModelConfig(**values)
    return Model(config, init_params(config, seed=seed, std=0.5))


def batch(seed: int, vocab_size: int = 64, B: int = 3, T: int = 12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
    weights = rng.random((B, T)).astype(np.float32)
    return tokens, targets, weights


def train_step(model: Model, seed: int) -> dict:
    """Run forward, cross-entropy and backward, and return the logits, loss and gradients."""
    tokens, targets, weights = batch(seed, model.config.vocab_size)
    model.zero_grad()
    logits = model.forward(tokens)
    loss = model.accumulate_ce(tokens, targets, weights, scale=0.5)
    return {"logits": logits, "loss": loss, **{name: grad.copy() for name, grad in model.grads.items()}}


def sample(model: Model, seed: int) -> list:
    """Generate with top-k and top-p sampling, the path that sorts candidate tokens."""
    prompts = [[1, 2, 3], [4, 5], [6]]
    return model.generate_ids(prompts, max_new_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=seed)


def run_in_threads(jobs: list) -> list:
    """Run each job (a function of no arguments) in its own thread and return results in job order.

    An exception in a job is re-raised in the calling thread.
    """
    results = [None] * len(jobs)
    errors = []
    start = threading.Barrier(len(jobs))

    def run(index, job):
        try:
            start.wait()
            results[index] = job()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index, job)) for index, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
        assert not thread.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.fixture(autouse=True)
def two_threads_per_call():
    """Use two OpenMP threads per call, so that each Python thread runs its own parallel loops."""
    before = _core.get_num_threads()
    _core.set_num_threads(2)
    yield
    _core.set_num_threads(before)


# --------------------------------------------------------------------------- two models


def test_two_models_train_like_sequential():
    models = [make_model(seed=1), make_model(seed=2)]
    rounds = 6
    expected = [[train_step(model, seed) for seed in range(rounds)] for model in models]

    results = run_in_threads([lambda model=model: [train_step(model, seed) for seed in range(rounds)]
                              for model in models])

    for model_results, model_expected in zip(results, expected):
        for actual, wanted in zip(model_results, model_expected):
            assert_same(actual, wanted)


def test_two_models_sample_like_sequential():
    # A large vocabulary makes each sort of the candidates long, so the two threads' sorts overlap.
    models = [make_model(seed=3, vocab_size=4096), make_model(seed=4, vocab_size=4096)]
    rounds = 4
    expected = [[sample(model, seed) for seed in range(rounds)] for model in models]

    results = run_in_threads([lambda model=model: [sample(model, seed) for seed in range(rounds)]
                              for model in models])

    assert results == expected


def test_two_models_greedy_generation_like_sequential():
    models = [make_model(seed=5), make_model(seed=6, num_kv_heads=4)]
    prompts = [[1, 2, 3, 4], [5]]
    expected = [model.generate_ids(prompts, max_new_tokens=12) for model in models]

    results = run_in_threads([lambda model=model: [model.generate_ids(prompts, max_new_tokens=12)
                                                   for _ in range(4)] for model in models])

    for model_results, wanted in zip(results, expected):
        assert all(result == wanted for result in model_results)


# --------------------------------------------------------------------------- one engine


class ParkingList:
    """A parameter list whose iteration stops halfway until released.

    The engine turns the list into a tuple inside each call, so iterating
    it parks the calling thread inside the call, with the GIL released while
    it waits.
    """

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.parked = threading.Event()
        self.release = threading.Event()

    def __iter__(self):
        for index, array in enumerate(self.arrays):
            if index == len(self.arrays) // 2:
                self.parked.set()
                assert self.release.wait(JOIN_SECONDS), "the parked call was never released"
            yield array


def call_while_parked(start_call, second_call) -> list:
    """Park one thread inside start_call, run second_call meanwhile, and return both outcomes.

    start_call receives the ParkingList to pass as params. Each outcome is
    ("ok", result) or ("error", exception).
    """
    model = make_model(seed=7)
    parking = ParkingList(model.param_list())
    outcomes = {}

    def first():
        try:
            outcomes["first"] = ("ok", start_call(model, parking))
        except Exception as error:  # noqa: BLE001 - returned for the assertions
            outcomes["first"] = ("error", error)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert parking.parked.wait(JOIN_SECONDS), "the first call never started iterating its params"
        try:
            outcomes["second"] = ("ok", second_call(model))
        except Exception as error:  # noqa: BLE001 - returned for the assertions
            outcomes["second"] = ("error", error)
    finally:
        parking.release.set()
        thread.join(JOIN_SECONDS)
    assert not thread.is_alive(), "the first call did not finish"
    return [outcomes["first"], outcomes["second"], model]


def forward_with(model: Model, params, B: int = 2, T: int = 8, seed: int = 0) -> np.ndarray:
    tokens, _targets, _weights = batch(seed, model.config.vocab_size, B, T)
    mask = np.ones_like(tokens)
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    model.engine.forward(params, tokens, positions, mask)
    return model.engine.logits()


SECOND_CALLS = {
    "forward": lambda model: forward_with(model, model.param_list(), B=4, T=16, seed=1),
    "logits": lambda model: model.engine.logits(),
    "hidden": lambda model: model.engine.hidden(),
    "generate": lambda model: model.generate_ids([[1, 2]], max_new_tokens=2),
    "set_inv_freq": lambda model: model.engine.set_inv_freq(np.ones(model.config.head_dim // 2, np.float32)),
}


@pytest.mark.parametrize("second", sorted(SECOND_CALLS))
def test_shared_engine_second_call_raises_during_forward(second):
    first, second_outcome, model = call_while_parked(lambda model, params: forward_with(model, params),
                                                     SECOND_CALLS[second])

    kind, error = second_outcome
    assert kind == "error" and isinstance(error, RuntimeError), second_outcome
    assert "in use by another thread" in str(error)
    assert first[0] == "ok", first
    expected = forward_with(model, model.param_list())
    np.testing.assert_array_equal(first[1], expected)


def test_shared_engine_second_call_raises_during_backward():
    def start_backward(model, params):
        tokens, targets, weights = batch(0, model.config.vocab_size, 2, 8)
        model.run(tokens)
        model.engine.cross_entropy(targets, weights, 1.0)
        model.engine.backward(params, model._grad_list())

    first, second_outcome, _model = call_while_parked(start_backward, SECOND_CALLS["forward"])

    kind, error = second_outcome
    assert kind == "error" and isinstance(error, RuntimeError), second_outcome
    assert first[0] == "ok", first


def test_shared_engine_second_call_raises_during_generate():
    def start_generate(model, params):
        tokens = np.array([[1, 2, 3]], np.int32)
        return model.engine.generate(params, tokens, np.ones_like(tokens), 4)

    first, second_outcome, _model = call_while_parked(start_generate, SECOND_CALLS["forward"])

    kind, error = second_outcome
    assert kind == "error" and isinstance(error, RuntimeError), second_outcome
    assert first[0] == "ok", first


def test_shared_engine_stress_never_corrupts():
    """Two threads hammer one engine: every call either raises RuntimeError or returns a correct result."""
    model = make_model(seed=8)
    shapes = [(1, 4), (2, 8), (3, 16), (4, 24)]
    expected = {shape: forward_with(model, model.param_list(), *shape, seed=sum(shape)) for shape in shapes}
    rounds = 40

    def forwards():
        refused = 0
        for index in range(rounds):
            shape = shapes[index % len(shapes)]
            try:
                logits = forward_with(model, model.param_list(), *shape, seed=sum(shape))
            except RuntimeError:
                refused += 1
                continue
            np.testing.assert_array_equal(logits, expected[shape])
        return refused

    def logits_reads():
        refused = 0
        for _ in range(rounds * 4):
            try:
                logits = model.engine.logits()
            except RuntimeError:
                refused += 1
                continue
            assert any(logits.shape == wanted.shape for wanted in expected.values())
        return refused

    run_in_threads([forwards, logits_reads])

    for shape, wanted in expected.items():
        np.testing.assert_array_equal(forward_with(model, model.param_list(), *shape, seed=sum(shape)), wanted)
