"""skupy.compare and its CLI: method comparison, lambda sweep and the budget-based choice of lambda.

Training runs use a tiny random model with the real tokenizer and a small
slice of the real data, and the NLL stand-in evaluator, so they test the
plumbing and the files rather than the quality of any method.
"""
import csv
import dataclasses
import json
import math

import pytest

from skupy import compare as compare_module
from skupy.compare import (StandInSettings, choose_lambda, compare, nll_metrics, parse_budget, parse_lambdas,
                           sweep_lambda, utility_losses)
from skupy.config import ModelConfig
from skupy.methods import build_method
from skupy.model import Model, init_params
from skupy.sku_config import SKUConfig

from .helpers import data_dir_or_skip, packaged_tokenizer_or_skip

SETTINGS = StandInSettings(num_prompts=4, template="sku", max_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return packaged_tokenizer_or_skip()


@pytest.fixture(scope="module")
def data():
    from skupy.data import load_sku_data

    full = load_sku_data(data_dir_or_skip())
    return dataclasses.replace(full, harmful_train=full.harmful_train[:2], normal_train=full.normal_train[:2],
                               harmful_test=full.harmful_test[:4], normal_test=full.normal_test[:4])


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return config, init_params(config, seed=0), tokenizer


def tiny_config(**changes):
    values = dict(template="sku", max_length=64, batch_size=2, num_random_answers=2, max_unlearn_steps=2, lr=1e-2,
                  weight_decay=0.0, lora=True, lora_rank=4, lora_alpha=8.0)
    values.update(changes)
    return SKUConfig(**values)


@pytest.fixture(scope="module")
def tv_run(tiny, data, tmp_path_factory):
    """An output folder of the plain task-vector method."""
    folder = tmp_path_factory.mktemp("tv_run")
    build_method("tv", tiny_config(), model=tiny, data=data, progress=False, eval_pairs=0).run(folder,
                                                                                             save_model=False)
    return folder


# ----------------------------------------------------------------------
# compare


def test_compare_writes_table_and_plot(tiny, data, tmp_path):
    table = compare(["ga", "tv"], tiny_config(), data, None, SETTINGS, tmp_path, model=tiny, evaluate=nll_metrics)

    assert [row["method"] for row in table.rows] == ["original", "ga", "tv"]
    original, ga, tv = table.rows
    # Two steps on two pairs barely move held-out NLLs; the methods' direction is tested in test_methods.
    assert ga["harmful_nll"] != original["harmful_nll"]
    assert tv["harmful_nll"] != original["harmful_nll"]
    assert ga["weight_change_norm"] > 0
    assert ga["train_seconds"] > 0

    for name in ("compare.csv", "compare.md", "compare.json", "compare.png", "runs/ga/manifest.json",
                 "runs/ga/eval/metrics.json", "original_eval/metrics.json",
                 "runs/tv/task_vector.safetensors"):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["original", "ga", "tv"]
    assert float(rows[1]["harmful_nll"]) == pytest.approx(ga["harmful_nll"])
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith("Judge: refusal.\n\n| method | harmful_nll | normal_nll |")
    document = json.loads((tmp_path / "compare.json").read_text())
    assert document["methods"] == ["ga", "tv"]
    assert document["config"]["max_unlearn_steps"] == 2
    assert json.loads((tmp_path / "runs" / "ga" / "manifest.json").read_text())["method"] == "ga"


def test_judge_header_reports_agreement():
    from skupy.compare import judge_header

    class MeasuredJudge:
        name = "learned"
        agreement = {"accuracy": 0.6458, "f1": 0.6473, "num_examples": 2298}

        def __call__(self, pairs):
            return []

    header = judge_header(MeasuredJudge())
    assert header == ("Judge: learned (held-out agreement with human labels: accuracy 0.646, F1 0.647, "
                      "2298 responses).")


def test_compare_unknown_method_before_training(tiny, data, tmp_path):
    with pytest.raises(ValueError, match="valid methods: .*llmu"):
        compare(["ga", "forget_everything"], tiny_config(), data, None, SETTINGS, tmp_path, model=tiny,
                evaluate=nll_metrics)
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_used_folder(tiny, data, tmp_path):
    (tmp_path / "runs" / "ga").mkdir(parents=True)
    (tmp_path / "runs" / "ga" / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already has runs of ga"):
        compare(["ga"], tiny_config(), data, None, SETTINGS, tmp_path, model=tiny, evaluate=nll_metrics)


def test_evaluator_receives_original_as_reference(tiny, data, tmp_path):
    calls = []

    def evaluate(model, data, judge, reference_model=None, settings=None):
        calls.append((model, judge, reference_model, settings))
        return {"harmful_rate": 0.5, "truthfulqa": {"mc2": 0.4}, "note": "text"}

    table = compare(["ft"], tiny_config(), data, "my-judge", "my-settings", tmp_path, model=tiny,
                    evaluate=evaluate)
    assert len(calls) == 2
    original = calls[0][0]
    assert all(reference is original for _, _, reference, _ in calls)
    assert all(judge == "my-judge" and settings == "my-settings" for _, judge, _, settings in calls)
    assert table.rows[1]["truthfulqa.mc2"] == 0.4
    assert table.rows[1]["note"] == "text"


def test_table_uses_metrics_of_evaluate_results(tiny, data, tmp_path):
    def evaluate(model, data, judge, reference_model=None, settings=None):
        return {"metrics": {"harmful_rate_pku": 0.25, "fluency": None}, "counts": {"pku_prompts": 4},
                "responses": {"pku": []}, "judge": {"name": "refusal", "agreement": {}}}

    table = compare(["ft"], tiny_config(), data, None, None, tmp_path, model=tiny, evaluate=evaluate)
    assert table.columns == ["method", "harmful_rate_pku", "fluency", "eval_seconds", "train_seconds",
                             "weight_change_norm"]
    assert table.rows[0]["fluency"] is None
    assert (tmp_path / "original_eval" / "results.json").is_file()
    assert (tmp_path / "runs" / "ft" / "eval" / "results.md").is_file()


def test_compare_with_real_evaluator(tiny, data, tmp_path):
    evaluate_module = pytest.importorskip("skupy.evaluate")
    settings = evaluate_module.EvalSettings(num_prompts=2, max_new_tokens=4, template="sku", max_length=64,
                                            batch_size=4)
    table = compare(["ga"], tiny_config(max_unlearn_steps=1), data, None, settings, tmp_path, model=tiny)

    assert [row["method"] for row in table.rows] == ["original", "ga"]
    for key in ("harmful_rate_pku", "truthfulqa_mc2", "fluency", "harmful_nll", "normal_nll"):
        assert key in table.columns, key
    original = table.rows[0]
    assert 0.0 <= original["harmful_rate_pku"] <= 1.0
    assert (tmp_path / "compare.png").is_file()


def test_metric_directions_match_evaluate():
    evaluate_module = pytest.importorskip("skupy.evaluate")
    for key, _, better in evaluate_module.METRIC_TABLE:
        assert compare_module.metric_direction(key) == (1 if better == "higher" else -1), key


# ----------------------------------------------------------------------
# sweep


def test_sweep_from_run_folder(tiny, data, tv_run, tmp_path):
    # Evaluated on the training pairs, which the task vector learned, so negating it must raise their NLL.
    on_training_pairs = dataclasses.replace(data, harmful_test=data.harmful_train, normal_test=data.normal_train)
    result = sweep_lambda(tv_run, "0.5,1,2", on_training_pairs, None, SETTINGS, tmp_path, model=tiny,
                          evaluate=nll_metrics, utility_budget="normal_nll=100%")

    assert [row["lambda"] for row in result.results] == [0.0, 0.5, 1.0, 2.0]
    harmful = [row["harmful_nll"] for row in result.results]
    assert harmful == sorted(harmful)
    assert harmful[-1] > harmful[0]
    assert result.harm_metric == "harmful_nll"
    assert result.utility_metric == "normal_nll"
    assert result.chosen_lambda == 2.0
    for name in ("sweep.csv", "sweep.md", "sweep.json", "tradeoff.png", "lambda_0/metrics.json",
                 "lambda_2/metrics.json"):
        assert (tmp_path / name).is_file(), name
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert document["chosen_lambda"] == 2.0
    assert document["budget"] == "normal_nll=100%"


def test_sweep_matches_negation_of_task_vector(tiny, data, tv_run):
    from skupy.task_vector import TaskVector

    task_vector = TaskVector.load(tv_run / "task_vector.safetensors")
    base = Model(tiny[0], tiny[1], trainable=[], tokenizer=tiny[2])
    result = sweep_lambda((base, task_vector), [1.5], data, None, SETTINGS, evaluate=nll_metrics)
    negated = Model(tiny[0], task_vector.negate_into(tiny[1], 1.5), trainable=[], tokenizer=tiny[2])
    expected = nll_metrics(negated, data, settings=SETTINGS)
    assert result.results[1]["harmful_nll"] == pytest.approx(expected["harmful_nll"], rel=1e-6)
    assert result.files == {}


def test_sweep_rejects_direct_method_run(tiny, data, tmp_path):
    build_method("ga", tiny_config(max_unlearn_steps=1), model=tiny, data=data, progress=False,
                 eval_pairs=0).run(tmp_path, save_model=False)
    with pytest.raises(ValueError, match="does not end with negation"):
        sweep_lambda(tmp_path, [1.0], data, None, SETTINGS, model=tiny, evaluate=nll_metrics)


def test_sweep_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        sweep_lambda(tmp_path / "absent", [1.0])


# ----------------------------------------------------------------------
# lambdas and budgets


def test_parse_lambdas_forms():
    assert parse_lambdas("1, 0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_lambdas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_lambdas("0:0.3:0.1") == [0.0, 0.1, 0.2, 0.3]
    assert parse_lambdas([2, 1]) == [1.0, 2.0]


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    (" , ", "empty"),
    ([], "empty"),
    ("0,nan", "finite"),
    ("inf", "finite"),
    ([1.0, float("-inf")], "finite"),
    ("0,abc", "must be a number"),
    ("0:1:0", "step must be > 0"),
    ("1:0:0.5", "ends before it starts"),
    ("0:1", "start:stop:step"),
    ("0:inf:1", "finite"),
])
def test_parse_lambdas_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lambdas(text)


def test_sweep_empty_lambdas_before_loading(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        sweep_lambda(tmp_path / "absent", [])


RESULTS = [
    {"lambda": 0.0, "harmful_rate": 0.40, "mc2": 0.400, "fluency": 10.0},
    {"lambda": 0.5, "harmful_rate": 0.30, "mc2": 0.395, "fluency": 10.5},
    {"lambda": 1.0, "harmful_rate": 0.20, "mc2": 0.385, "fluency": 10.9},
    {"lambda": 1.5, "harmful_rate": 0.10, "mc2": 0.370, "fluency": 12.0},
    {"lambda": 2.0, "harmful_rate": 0.05, "mc2": 0.300, "fluency": 20.0},
]


def test_choose_lambda_points_units_percent():
    # MC2 is a fraction, so a plain number is in percentage points; fluency (perplexity) is in its own unit.
    assert choose_lambda(RESULTS, "mc2=2") == 1.0
    assert choose_lambda(RESULTS, "mc2=4") == 1.5
    assert choose_lambda(RESULTS, "fluency=10%") == 1.0
    assert choose_lambda(RESULTS, "fluency=2") == 1.5
    assert choose_lambda(RESULTS, "mc2=4,fluency=10%") == 1.0
    assert choose_lambda(RESULTS, {"mc2": 100, "fluency": "100%"}) == 2.0
    assert choose_lambda(RESULTS, "mc2=0") == 0.0
    assert choose_lambda(RESULTS, "mc2=25%") == 2.0


def test_choose_lambda_takes_largest_not_first_gap():
    results = [dict(row) for row in RESULTS]
    results[2]["mc2"] = 0.2  # lambda 1 breaks the budget, lambda 1.5 keeps it
    assert choose_lambda(results, "mc2=4") == 1.5


def test_choose_lambda_skips_missing_and_nan():
    results = [dict(row) for row in RESULTS]
    results[3]["mc2"] = float("nan")
    del results[4]["mc2"]
    assert choose_lambda(results, "mc2=100") == 1.0


def test_choose_lambda_metric_names_and_aliases():
    nested = [{"lambda": 0.0, "truthfulqa.mc2": 0.4}, {"lambda": 1.0, "truthfulqa.mc2": 0.39}]
    assert choose_lambda(nested, "mc2=2") == 1.0
    evaluate_keys = [{"lambda": 0.0, "truthfulqa_mc2": 0.4}, {"lambda": 1.0, "truthfulqa_mc2": 0.39}]
    assert choose_lambda(evaluate_keys, "mc2=2") == 1.0
    assert choose_lambda(evaluate_keys, "truthfulqa_mc2=0.5") == 0.0


def test_choose_lambda_bad_input():
    with pytest.raises(ValueError, match="no results"):
        choose_lambda([], "mc2=2")
    with pytest.raises(ValueError, match="lambda = 0"):
        choose_lambda(RESULTS[1:], "mc2=2")
    with pytest.raises(ValueError, match="'lambda' key"):
        choose_lambda([{"mc2": 0.4}], "mc2=2")
    with pytest.raises(ValueError, match="not in the results"):
        choose_lambda(RESULTS, "similarity=1")
    with pytest.raises(ValueError, match="no known direction"):
        choose_lambda(RESULTS, "accuracy=1")
    with pytest.raises(ValueError, match="baseline value"):
        choose_lambda([{"lambda": 0.0, "mc2": math.nan}], "mc2=2")
    with pytest.raises(ValueError, match="baseline value"):
        choose_lambda([{"lambda": 0.0, "mc2": None}], "mc2=2")


@pytest.mark.parametrize("budget,message", [
    ("", "empty"),
    ("mc2", "form metric=amount"),
    ("mc2=-1", ">= 0"),
    ("mc2=nan", ">= 0"),
    ("mc2=abc", "must be a number"),
    ("mc2=1,mc2=2", "twice"),
    ("mc2=1,truthfulqa_mc2=2", "twice"),
    (3, "must be a string"),
])
def test_parse_budget_bad_input(budget, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(budget)


def test_utility_losses_direction():
    baseline, row = RESULTS[0], RESULTS[2]
    losses = utility_losses(row, baseline, "mc2=1,fluency=1%,harmful_rate=1")
    assert losses["mc2"] == pytest.approx(1.5)  # percentage points
    assert losses["fluency"] == pytest.approx(9.0)  # percent of the baseline
    assert losses["harmful_rate"] == pytest.approx(-20.0)  # a drop of a lower-is-better metric is a gain


# ----------------------------------------------------------------------
# command line


@pytest.fixture
def cli_main(monkeypatch):
    from skupy import cli

    monkeypatch.setattr(cli, "EXTRA_COMMAND_MODULES", (".compare_cli",))
    return cli.main


def test_cli_compare_unknown_method(cli_main, capsys, tmp_path):
    code = cli_main(["compare", "--methods", "sku,unlearn_all", "--preset", "smollm2-135m", "--out", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err
    assert "unknown method 'unlearn_all'" in error
    assert "ga_mismatch" in error


def test_cli_sweep_bad_lambdas(cli_main, capsys, tmp_path):
    code = cli_main(["sweep-lambda", str(tmp_path), "--lambdas", "0,inf", "--out", str(tmp_path / "sweep")])
    assert code == 2
    assert "finite" in capsys.readouterr().err


def test_cli_sweep_end_to_end(cli_main, capsys, tiny, tv_run, tmp_path, monkeypatch):
    from skupy.hf_io import save_hf

    save_hf(tmp_path / "base", tiny[0], tiny[1], tiny[2])
    monkeypatch.setattr(compare_module, "default_evaluator", lambda: nll_metrics)
    monkeypatch.setenv("SKUPY_DATA_DIR", str(data_dir_or_skip()))
    code = cli_main(["sweep-lambda", str(tv_run), "--lambdas", "0:1:0.5", "--model", str(tmp_path / "base"),
                     "--num-prompts", "2", "--utility-budget", "normal_nll=100%", "--out", str(tmp_path / "sweep")])
    assert code == 0
    output = capsys.readouterr().out
    assert "| lambda | harmful_nll | normal_nll |" in output
    assert "chosen lambda: 1" in output
    assert (tmp_path / "sweep" / "tradeoff.png").is_file()
