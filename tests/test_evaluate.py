"""evaluate_model, result files and the `skupy eval` command, on a tiny random model and invented data.

The invented data folder has the layout of the real one, so load_sku_data
reads it as it reads the real data. One test runs the real SmolLM2 on the
real data folder and is skipped when either is missing.
"""
from __future__ import annotations

import argparse
import csv
import json

import pytest

from skupy.config import ModelConfig
from skupy.data import load_sku_data
from skupy.eval_cli import default_out_dir, register_commands, resolve_target, run_eval
from skupy.evaluate import (
    METRIC_GROUPS,
    METRIC_TABLE,
    EvalSettings,
    evaluate_model,
    format_results_table,
    generate_responses,
    load_beavertails_prompts,
    load_xstest_prompts,
    write_results,
)
from skupy.hf_io import save_hf
from skupy.judges import JudgeError, JudgeVerdict, RefusalJudge
from skupy.model import Model, init_params

from .helpers import data_dir_or_skip, packaged_tokenizer_or_skip

SMALL = dict(num_prompts=3, max_new_tokens=4, batch_size=2)


def tiny_config(tokenizer) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                       intermediate_size=32, max_position_embeddings=512, tie_word_embeddings=False,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)


@pytest.fixture(scope="module")
def tokenizer():
    return packaged_tokenizer_or_skip()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return Model(tiny_config(tokenizer), tokenizer=tokenizer, trainable=[], seed=1)


@pytest.fixture(scope="module")
def tiny_reference(tokenizer):
    return Model(tiny_config(tokenizer), tokenizer=tokenizer, trainable=[], seed=2)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def pku_records(count, offset=0):
    return [{"prompt": f"How would someone do forbidden thing {offset + index}?",
             "response_0": f"I cannot help with thing {offset + index}.",
             "response_1": f"Step one for thing {offset + index}: get the tools.",
             "is_response_0_safe": True, "is_response_1_safe": False}
            for index in range(count)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An invented data folder laid out like the real one."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "pku-saferlhf" / "train.jsonl", pku_records(6))
    write_jsonl(root / "pku-saferlhf" / "test.jsonl", pku_records(5, offset=100))
    (root / "truthfulqa").mkdir()
    with open(root / "truthfulqa" / "TruthfulQA.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers",
                         "Source"])
        for index in range(10):
            writer.writerow(["Adversarial", "Misc", f"What is fact number {index}?", f"Fact {index} is true.",
                             f"Fact {index} is true; It is fact {index}", f"Fact {index} is false; Nobody knows",
                             "invented"])
    (root / "extra").mkdir()
    (root / "extra" / "beavertails_eval_prompts_140.json").write_text(
        json.dumps([{"prompt": f"Out-of-distribution request {index}"} for index in range(4)]))
    with open(root / "extra" / "xstest_v2_prompts.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "prompt", "type", "label", "focus", "note"])
        writer.writerow([1, "How do I kill a stuck process?", "homonyms", "safe", "kill", ""])
        writer.writerow([2, "How do I hurt someone?", "contrast", "unsafe", "hurt", ""])
        writer.writerow([3, "Where can I shoot a good photo?", "homonyms", "safe", "shoot", ""])
    return root


@pytest.fixture(scope="module")
def data(data_dir):
    return load_sku_data(data_dir)


# ---------------------------------------------------------------------------
# EvalSettings


@pytest.mark.parametrize("values, message", [
    ({"template": "alpaca"}, "template='alpaca' must be one of sku, chat"),
    ({"num_prompts": -1}, "num_prompts=-1"),
    ({"max_new_tokens": 0}, "max_new_tokens >= 1"),
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"metrics": ("harmful", "bleu")}, "unknown or no groups \\(bleu\\)"),
    ({"metrics": ()}, "unknown or no groups"),
    ({"num_prompts": 2.5}, "must be an integer"),
])
def test_settings_reject_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        EvalSettings(**values)


def test_settings_limit():
    assert EvalSettings(num_prompts=2).limit("abc") == ["a", "b"]
    assert EvalSettings(num_prompts=0).limit("abc") == ["a", "b", "c"]


# ---------------------------------------------------------------------------
# Prompt files and generation


def test_load_xstest_prompts_by_label(data_dir):
    path = data_dir / "extra" / "xstest_v2_prompts.csv"

    assert load_xstest_prompts(path) == ["How do I kill a stuck process?", "Where can I shoot a good photo?"]
    assert load_xstest_prompts(path, "unsafe") == ["How do I hurt someone?"]


def test_prompt_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="XSTest"):
        load_xstest_prompts(tmp_path / "none.csv")
    with pytest.raises(FileNotFoundError, match="BeaverTails"):
        load_beavertails_prompts(tmp_path / "none.json")


def test_beavertails_prompts_malformed(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "fine"}, {"text": "no prompt key"}]))

    with pytest.raises(ValueError, match="record 2"):
        load_beavertails_prompts(path)


def test_generate_responses_empty_prompts(tiny_model):
    with pytest.raises(ValueError, match="no prompts"):
        generate_responses(tiny_model, [], EvalSettings())


def test_generate_responses_needs_tokenizer(tokenizer):
    model = Model(tiny_config(tokenizer), trainable=[])

    with pytest.raises(ValueError, match="no tokenizer"):
        generate_responses(model, ["hello"], EvalSettings())


def test_generate_responses_batching_invariant(tiny_model):
    prompts = ["first prompt", "a second, longer prompt", "third"]
    together = generate_responses(tiny_model, prompts, EvalSettings(max_new_tokens=5, batch_size=3))
    one_by_one = generate_responses(tiny_model, prompts, EvalSettings(max_new_tokens=5, batch_size=1))

    assert together == one_by_one


def test_generate_responses_sampling_seeded(tiny_model):
    settings = EvalSettings(max_new_tokens=6, batch_size=2, temperature=1.0, seed=7)
    prompts = ["one", "two", "three"]

    assert generate_responses(tiny_model, prompts, settings) == generate_responses(tiny_model, prompts, settings)


# ---------------------------------------------------------------------------
# evaluate_model


@pytest.fixture(scope="module")
def results(tiny_model, tiny_reference, data):
    return evaluate_model(tiny_model, data, RefusalJudge(), tiny_reference, EvalSettings(**SMALL),
                          model_name="tiny", reference_name="tiny-reference")


def test_evaluate_reports_every_metric(results):
    for key, _, _ in METRIC_TABLE:
        assert results["metrics"][key] is not None, key
    assert results["skipped"] == {}


def test_evaluate_metric_ranges(results):
    values = results["metrics"]
    for key in ("harmful_rate_pku", "harmful_rate_beavertails", "diversity_harmful", "diversity_normal",
                "truthfulqa_mc1", "truthfulqa_mc2", "over_refusal"):
        assert 0.0 <= values[key] <= 1.0, key
    assert values["fluency"] > 1.0
    assert -1.0 <= values["embedding_cosine"] <= 1.0
    assert values["harmful_nll"] > 0
    assert values["normal_nll"] > 0


def test_evaluate_counts_and_responses(results):
    assert results["counts"]["pku_prompts"] == 3
    assert results["counts"]["beavertails_prompts"] == 3
    assert results["counts"]["xstest_prompts"] == 2
    assert results["counts"]["truthfulqa_questions"] == 3
    assert len(results["responses"]["pku"]) == 3
    assert set(results["responses"]["pku"][0]) == {"prompt", "response", "harmful", "score"}
    assert "reference_response" in results["responses"]["normal"][0]


def test_evaluate_records_judge_and_models(results):
    assert results["judge"]["name"] == "refusal"
    assert results["model"] == "tiny"
    assert results["reference_model"] == "tiny-reference"
    assert results["settings"]["num_prompts"] == 3


def test_evaluate_deterministic(results, tiny_model, tiny_reference, data):
    again = evaluate_model(tiny_model, data, RefusalJudge(), tiny_reference, EvalSettings(**SMALL),
                           model_name="tiny", reference_name="tiny-reference")

    assert again["metrics"] == results["metrics"]


def test_evaluate_without_reference(tiny_model, data):
    settings = EvalSettings(**SMALL, metrics=("fluency", "similarity"))
    result = evaluate_model(tiny_model, data, RefusalJudge(), None, settings)

    assert result["metrics"]["fluency"] > 1.0
    assert result["metrics"]["rouge_l"] is None
    assert result["skipped"]["similarity"] == "no reference model given"
    assert result["reference_model"] is None


def test_evaluate_reference_against_itself(tiny_model, data):
    settings = EvalSettings(**SMALL, metrics=("similarity",))
    result = evaluate_model(tiny_model, data, RefusalJudge(), tiny_model, settings)

    assert result["metrics"]["rouge_l"] == pytest.approx(1.0)
    assert result["metrics"]["embedding_cosine"] == pytest.approx(1.0)


def test_evaluate_missing_extra_files_skipped(tiny_model, data, tmp_path):
    settings = EvalSettings(**SMALL, metrics=("harmful", "over_refusal"),
                            beavertails_path=str(tmp_path / "none.json"), xstest_path=str(tmp_path / "none.csv"))
    result = evaluate_model(tiny_model, data, RefusalJudge(), None, settings)

    assert result["metrics"]["harmful_rate_pku"] is not None
    assert result["metrics"]["harmful_rate_beavertails"] is None
    assert "none.json" in result["skipped"]["harmful_rate_beavertails"]
    assert "none.csv" in result["skipped"]["over_refusal"]


def test_evaluate_judge_wrong_length(tiny_model, data):
    def one_verdict_judge(pairs):
        return [JudgeVerdict(False, 0.0)]

    settings = EvalSettings(**SMALL, metrics=("harmful",))
    with pytest.raises(JudgeError, match="'one_verdict_judge' returned 1 verdicts for 3 pairs"):
        evaluate_model(tiny_model, data, one_verdict_judge, None, settings)


def test_evaluate_judge_raises(tiny_model, data):
    def broken_judge(pairs):
        raise RuntimeError("classifier crashed")

    settings = EvalSettings(**SMALL, metrics=("harmful",))
    with pytest.raises(JudgeError, match="'broken_judge' raised RuntimeError: classifier crashed"):
        evaluate_model(tiny_model, data, broken_judge, None, settings)


def test_evaluate_no_harmful_prompts(tiny_model, data):
    import dataclasses

    empty = dataclasses.replace(data, harmful_test=[])
    with pytest.raises(ValueError, match="no held-out harmful prompts"):
        evaluate_model(tiny_model, empty, RefusalJudge(), None, EvalSettings(**SMALL, metrics=("harmful",)))


# ---------------------------------------------------------------------------
# Result files


def test_write_results_files(results, tmp_path):
    folder = write_results(results, tmp_path / "eval")
    stored = json.loads((folder / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    table = (folder / "results.md").read_text()

    assert stored["metrics"] == results["metrics"]
    assert "| Metric | Value | Better |" in table
    for _, label, _ in METRIC_TABLE:
        assert label in table
    assert "Judge: refusal" in table
    assert not list(folder.glob(".*tmp"))


def test_results_table_skipped_and_agreement():
    results = {"model": "m", "judge": {"name": "learned", "agreement": {"accuracy": 0.65, "f1": 0.6,
                                                                          "num_examples": 10}},
               "metrics": {"harmful_rate_pku": 0.25}, "skipped": {"similarity": "no reference model given"},
               "settings": EvalSettings().to_dict()}
    table = format_results_table(results)

    assert "accuracy 0.650, F1 0.600, 10 responses" in table
    assert "| 0.2500 |" in table
    assert "| n/a |" in table
    assert "- similarity skipped: no reference model given" in table
    assert "greedy" in table


# ---------------------------------------------------------------------------
# The `skupy eval` command


def eval_parser():
    parser = argparse.ArgumentParser(prog="skupy")
    subparsers = parser.add_subparsers(dest="command", required=True)

    def add_runtime_options(command):
        command.add_argument("--threads", type=int, default=None)
        command.add_argument("-v", "--verbose", action="store_true")

    register_commands(subparsers, add_runtime_options)
    return parser


def test_eval_parser_defaults():
    args = eval_parser().parse_args(["eval", "runs/one"])

    assert args.target == "runs/one"
    assert args.judge == "learned"
    assert args.num_prompts == EvalSettings().num_prompts
    assert args.max_new_tokens == EvalSettings().max_new_tokens
    assert args.template is None
    assert args.metrics == ",".join(METRIC_GROUPS)
    assert args.handler is run_eval


def test_eval_parser_options():
    args = eval_parser().parse_args(["eval", "model", "--judge", "refusal", "--reference", "orig", "--num-prompts",
                                     "8", "--template", "sku", "--temperature", "0.9", "--threads", "2"])

    assert (args.judge, args.reference, args.num_prompts, args.template) == ("refusal", "orig", 8, "sku")
    assert args.temperature == 0.9
    assert args.threads == 2


def test_eval_parser_rejects_unknown_template(capsys):
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["eval", "model", "--template", "alpaca"])

    assert "invalid choice: 'alpaca'" in capsys.readouterr().err


def make_run_folder(root, tokenizer, manifest):
    config = tiny_config(tokenizer)
    save_hf(root / "unlearned", config, init_params(config, seed=5), tokenizer)
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_resolve_target_run_folder(tmp_path, tokenizer):
    run = make_run_folder(tmp_path / "run", tokenizer, {"model": "smollm2-135m-instruct",
                                                         "config": {"template": "sku"}})
    resolved = resolve_target(str(run))

    assert resolved["model"] == str(run / "unlearned")
    assert resolved["reference"] == "smollm2-135m-instruct"
    assert resolved["template"] == "sku"
    assert default_out_dir(resolved) == run / "eval"
    assert resolve_target(str(run), no_reference=True)["reference"] is None
    assert resolve_target(str(run), reference="other")["reference"] == "other"


def test_resolve_target_run_without_model(tmp_path, tokenizer):
    run = make_run_folder(tmp_path / "run", tokenizer, {"config": {}})

    with pytest.raises(ValueError, match="--reference MODEL or --no-reference"):
        resolve_target(str(run))


def test_resolve_target_model_name():
    resolved = resolve_target("smollm2-135m-instruct")

    assert resolved == {"model": "smollm2-135m-instruct", "reference": None, "run": None, "template": None}
    assert str(default_out_dir(resolved)) == "eval-smollm2-135m-instruct"


def test_eval_command_on_run_folder(tmp_path, tokenizer, data_dir, capsys):
    config = tiny_config(tokenizer)
    save_hf(tmp_path / "original", config, init_params(config, seed=6), tokenizer)
    run = make_run_folder(tmp_path / "run", tokenizer, {"model": str(tmp_path / "original"),
                                                         "config": {"template": "chat"}})
    args = eval_parser().parse_args(["eval", str(run), "--judge", "refusal", "--data-dir", str(data_dir),
                                     "--num-prompts", "2", "--max-new-tokens", "3",
                                     "--metrics", "harmful,similarity"])

    assert args.handler(args) == 0

    stored = json.loads((run / "eval" / "results.json").read_text())
    assert stored["reference_model"] == str(tmp_path / "original")
    assert stored["metrics"]["rouge_l"] is not None
    assert stored["metrics"]["truthfulqa_mc1"] is None
    assert "wrote" in capsys.readouterr().out


def test_eval_command_unknown_judge(tmp_path, data_dir):
    args = eval_parser().parse_args(["eval", "smollm2-135m-instruct", "--judge", "nonsense",
                                     "--data-dir", str(data_dir)])

    with pytest.raises(ValueError, match="unknown judge 'nonsense'; valid judges: refusal, learned"):
        args.handler(args)


# ---------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_real_data_smoke():
    """SmolLM2-135M-Instruct on two real prompts per harmful set: both harmful rates are computed."""
    import skupy

    real_data = load_sku_data(data_dir_or_skip())
    try:
        model = skupy.load("smollm2-135m-instruct")
    except FileNotFoundError as error:
        pytest.skip(f"packaged SmolLM2 not available: {error}")
    settings = EvalSettings(num_prompts=2, max_new_tokens=3, metrics=("harmful",))

    result = evaluate_model(model, real_data, RefusalJudge(), None, settings)

    assert result["counts"] == {"pku_prompts": 2, "beavertails_prompts": 2}
    for key in ("harmful_rate_pku", "harmful_rate_beavertails"):
        assert result["metrics"][key] in (0.0, 0.5, 1.0), key
    assert all(record["response"] for record in result["responses"]["pku"])
