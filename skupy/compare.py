"""Compare unlearning methods, sweep the negation scale lambda and choose it under a utility budget.

compare() trains every requested method (skupy.methods) with one config, one
data set and one seed, evaluates each result and the original model with the
same evaluator, and writes a table and a bar plot. sweep_lambda() evaluates
theta_0 - lambda * tau for a list of lambdas from one task vector and plots
the trade-off between harmfulness and utility. choose_lambda() picks the
largest lambda whose utility loss against lambda = 0 stays within a budget.

Every file is written atomically (skupy.atomic).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text
from .methods import METHODS, build_method, parse_method_names
from .model import Model
from .sku_config import SKUConfig
from .task_vector import TaskVector

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("sku", "ga", "ga_mismatch", "llmu", "tv", "ft")

# Metrics that the plots prefer, most useful first; a metric missing from the results is skipped.
HARM_METRICS = ("harmful_rate_pku", "harmful_rate_beavertails", "harmful_rate", "harmful_nll")
UTILITY_METRICS = ("truthfulqa_mc2", "fluency", "normal_nll", "truthfulqa_mc1", "rouge_l", "over_refusal",
                   "diversity_normal")

# +1: higher is better, -1: lower is better, for the metrics of skupy.evaluate (METRIC_TABLE) and
# the stand-in evaluator.
METRIC_DIRECTIONS = {
    "harmful_rate_pku": -1, "harmful_rate_beavertails": -1, "diversity_harmful": 1, "diversity_normal": 1,
    "fluency": -1, "rouge_l": 1, "embedding_cosine": 1, "truthfulqa_mc1": 1, "truthfulqa_mc2": 1,
    "over_refusal": -1, "harmful_nll": 1, "normal_nll": -1,
}

# Short names accepted in budgets and metric options.
METRIC_ALIASES = {"mc1": "truthfulqa_mc1", "mc2": "truthfulqa_mc2", "harmful_rate": "harmful_rate_pku",
                  "similarity": "rouge_l", "diversity": "diversity_normal", "perplexity": "fluency"}

# Metrics reported as fractions in [0, 1]; a plain budget for them is in percentage points.
FRACTION_METRICS = frozenset({"harmful_rate_pku", "harmful_rate_beavertails", "diversity_harmful",
                              "diversity_normal", "rouge_l", "embedding_cosine", "truthfulqa_mc1",
                              "truthfulqa_mc2", "over_refusal"})

# Columns that describe a run rather than measure the model; plots leave them out.
RUN_COLUMNS = ("method", "lambda", "train_seconds", "eval_seconds", "weight_change_norm")

PathLike = Union[str, Path]


# ----------------------------------------------------------------------
# evaluation


@dataclass
class StandInSettings:
    """Settings of the stand-in evaluator: how many held-out pairs, and how they are encoded."""

    num_prompts: int = 32
    template: str = "sku"
    max_length: int = 256


def nll_metrics(model: Model, data, judge=None, reference_model: Optional[Model] = None,
                settings: Optional[StandInSettings] = None) -> dict:
    """Return the mean answer NLL of held-out harmful and normal pairs under model.

    A stand-in with the interface of skupy.evaluate.evaluate_model, used when
    that module is not installed. judge and reference_model are ignored.
    settings needs num_prompts (0 for every pair), template and max_length,
    as StandInSettings and EvalSettings have.
    """
    from .batching import encode_pairs, pad_id_for
    from .sku import answer_nll

    settings = settings or StandInSettings()
    limit = settings.num_prompts or None
    tokenizer = model.tokenizer
    harmful = encode_pairs(tokenizer, data.harmful_test[:limit], settings.template, settings.max_length)
    normal = encode_pairs(tokenizer, data.normal_test[:limit], settings.template, settings.max_length)
    pad_id = pad_id_for(tokenizer)
    return {"harmful_nll": answer_nll(model, harmful, pad_id), "normal_nll": answer_nll(model, normal, pad_id)}


def default_eval_settings(num_prompts: int, config: SKUConfig, **changes):
    """Build settings for default_evaluator(): num_prompts prompts per set and the config's prompt template.

    changes set other EvalSettings fields (max_new_tokens, metrics, ...). The
    stand-in evaluator accepts none.
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"the number of prompts must be an integer >= 1, got {num_prompts!r}")
    try:
        from .evaluate import EvalSettings
    except ImportError:
        if changes:
            raise ValueError(f"skupy.evaluate is not available, so these settings cannot apply: "
                             f"{', '.join(changes)}") from None
        return StandInSettings(num_prompts=num_prompts, template=config.template, max_length=config.max_length)
    return EvalSettings(num_prompts=num_prompts, template=config.template, **changes)


def default_evaluator() -> Callable:
    """Return skupy.evaluate.evaluate_model when that module exists, else the NLL stand-in."""
    try:
        from .evaluate import evaluate_model
    except ImportError:
        logger.warning("skupy.evaluate is not available; comparing held-out answer NLLs only")
        return nll_metrics
    return evaluate_model


def default_judge():
    """Return the refusal judge of skupy.judges, or None when that module is not available."""
    try:
        from .judges import RefusalJudge
    except ImportError:
        return None
    return RefusalJudge()


def run_evaluator(evaluate: Callable, model: Model, data, judge, reference_model: Model, settings) -> dict:
    """Call evaluate, leaving settings out when it is None so the evaluator uses its own defaults."""
    if settings is None:
        results = evaluate(model, data, judge, reference_model=reference_model)
    else:
        results = evaluate(model, data, judge, reference_model=reference_model, settings=settings)
    if not isinstance(results, dict):
        raise TypeError(f"the evaluator {_callable_name(evaluate)} returned {type(results).__name__}, expected a dict")
    return results


def metric_values(results: dict) -> dict:
    """Return the table columns of one evaluation: its "metrics" dict when it has one, else all of it, flattened."""
    if isinstance(results.get("metrics"), dict):
        return flatten_metrics(results["metrics"])
    return flatten_metrics(results)


def save_evaluation(results: dict, folder: Path) -> None:
    """Write one evaluation into folder: results.json and results.md for skupy.evaluate, else metrics.json."""
    if isinstance(results.get("metrics"), dict):
        try:
            from .evaluate import write_results
        except ImportError:
            pass
        else:
            write_results(results, folder)
            return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "metrics.json", json.dumps(results, indent=2, default=_json_default))


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Flatten nested metric dicts into "outer.inner" keys, keeping numbers, strings and None."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (bool, np.bool_)):
            flat[name] = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            flat[name] = float(value) if isinstance(value, (float, np.floating)) else int(value)
        elif value is None or isinstance(value, str):
            flat[name] = value
    return flat


# ----------------------------------------------------------------------
# tables and plots


@dataclass
class Table:
    """Rows of one result table; columns keep the order in which keys first appear."""

    rows: list = field(default_factory=list)
    header: str = ""  # markdown text printed above the table, e.g. the judge and its agreement

    @property
    def columns(self) -> list:
        names = {}
        for row in self.rows:
            for key in row:
                names.setdefault(key, None)
        return list(names)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in self.columns})
        return buffer.getvalue()

    def to_markdown(self) -> str:
        columns = self.columns
        lines = [self.header, ""] if self.header else []
        lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        for row in self.rows:
            cells = [f"{row[key]:g}" if key == "lambda" and _is_number(row.get(key)) else _format_cell(row.get(key))
                     for key in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def numeric_columns(self) -> list:
        """Metric columns that hold a finite number in at least one row."""
        result = []
        for key in self.columns:
            if key in RUN_COLUMNS:
                continue
            values = [row.get(key) for row in self.rows]
            if any(_is_number(value) and math.isfinite(value) for value in values):
                result.append(key)
        return result


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _csv_value(value):
    return "" if value is None else value


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.4g}"
    return str(value)


def write_table(table: Table, out: Path, stem: str, extra: Optional[dict] = None) -> dict:
    """Write STEM.csv, STEM.md and STEM.json (the rows plus extra) into out; returns the paths."""
    paths = {"csv": out / f"{stem}.csv", "markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
    atomic_write_text(paths["csv"], table.to_csv())
    atomic_write_text(paths["markdown"], table.to_markdown())
    document = {"rows": table.rows, **(extra or {})}
    atomic_write_text(paths["json"], json.dumps(document, indent=2, default=_json_default))
    return paths


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def preferred_metrics(table: Table, limit: int = 9) -> list:
    """Up to ``limit`` numeric metric columns: known harm and utility metrics first, then the rest."""
    available = table.numeric_columns()
    known = [name for name in HARM_METRICS + UTILITY_METRICS if name in available]
    others = [name for name in available if name not in known]
    return (known + others)[:limit]


def plot_comparison(table: Table, path: Path, metrics: Optional[Sequence[str]] = None) -> None:
    """Draw one bar chart per metric, one bar per row, into a PNG."""
    plt = _pyplot()
    metrics = list(metrics) if metrics is not None else preferred_metrics(table)
    if not metrics:
        raise ValueError("the comparison table has no numeric metric to plot")
    labels = [str(row["method"]) for row in table.rows]

    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colors = ["#777777"] + [f"C{i}" for i in range(len(labels) - 1)]

    for axis, metric in zip(axes.flat, metrics):
        values = [row.get(metric) for row in table.rows]
        finite = [value for value in values if _is_number(value) and math.isfinite(value)]
        heights = [value if _is_number(value) and math.isfinite(value) else 0.0 for value in values]
        bars = axis.bar(range(len(labels)), heights, color=colors[: len(labels)])
        axis.bar_label(bars, labels=[_format_cell(float(v)) if _is_number(v) else "n/a" for v in values],
                       fontsize=7)
        if finite:
            # Zoom in on the values: differences between methods are often small next to the values.
            low, high = min(finite), max(finite)
            margin = 0.25 * (high - low) if high > low else 0.05 * max(abs(high), 1e-6)
            bottom = low - margin
            if low >= 0 and bottom < 0:
                bottom = 0.0
            axis.set_ylim(bottom, high + margin)
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        axis.set_title(metric + _direction_hint(metric), fontsize=9)

    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    figure.tight_layout()
    _save_figure(figure, path)


# ----------------------------------------------------------------------
# compare


def compare(methods, config: SKUConfig, data=None, judge=None, eval_settings=None, out_dir: PathLike = "compare",
            *, model=None, evaluate: Optional[Callable] = None, progress: bool = False, save_models: bool = False,
            recompute: bool = False) -> Table:
    """Train each method with the same config, data and seed, evaluate it and the original model, write a table.

    methods: names from skupy.methods.METHODS, as a list or "sku,ga,tv".
    model: None to load config.model, or a (ModelConfig, params, tokenizer) tuple.
    data: None to load config.data_dir (or $SKUPY_DATA_DIR), or an SKUData.
    judge: None uses default_judge(), the refusal judge.
    evaluate: evaluate(model, data, judge, reference_model=, settings=) -> dict;
    None uses default_evaluator(). The original model is the reference model
    of every evaluation.

    Writes into out_dir: original_eval/ (the original model's evaluation),
    runs/METHOD/ (each method's outputs, as `skupy unlearn` writes them, with
    its evaluation in runs/METHOD/eval/), compare.csv, compare.md,
    compare.json and compare.png. Returns the table: one row for the original
    model, then one per method.
    """
    names = parse_method_names(methods)
    out = Path(out_dir)
    used = [name for name in names if (out / "runs" / name / "manifest.json").exists()]
    if used:
        raise FileExistsError(f"{out / 'runs'} already has runs of {', '.join(used)}; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)

    if model is None:
        from .checkpoint import load_checkpoint

        model = load_checkpoint(config.model)
    if data is None:
        from .data import load_sku_data

        data = load_sku_data(config.data_dir, seed=config.seed)
    evaluate = evaluate or default_evaluator()
    judge = judge if judge is not None else default_judge()
    base_config, base_params, tokenizer = model

    original = Model(base_config, base_params, trainable=[], tokenizer=tokenizer)
    table = Table(header=judge_header(judge))
    started = time.perf_counter()
    results = run_evaluator(evaluate, original, data, judge, original, eval_settings)
    save_evaluation(results, out / "original_eval")
    table.rows.append({"method": "original", **metric_values(results),
                       "eval_seconds": time.perf_counter() - started})
    logger.info("original model: %s", metric_values(results))

    for name in names:
        run_dir = out / "runs" / name
        method = build_method(name, config, model=model, data=data, progress=progress, recompute=recompute,
                              eval_pairs=0)
        started = time.perf_counter()
        result = method.run(run_dir, save_model=save_models)
        train_seconds = time.perf_counter() - started

        final = Model(base_config, result.final_params, trainable=[], tokenizer=tokenizer)
        started = time.perf_counter()
        results = run_evaluator(evaluate, final, data, judge, original, eval_settings)
        eval_seconds = time.perf_counter() - started
        save_evaluation(results, run_dir / "eval")

        scale = abs(method.config.negation_lambda) if result.negates else 1.0
        table.rows.append({"method": name, **metric_values(results), "train_seconds": train_seconds,
                           "eval_seconds": eval_seconds, "weight_change_norm": scale * result.task_vector.norm()})
        logger.info("%s: %s (trained in %.1f s)", name, metric_values(results), train_seconds)

    extra = {"methods": names, "config": config.to_dict(), "evaluator": _callable_name(evaluate),
             "judge": _judge_label(judge), "summaries": {name: METHODS[name].summary for name in names}}
    write_table(table, out, "compare", extra)
    plot_comparison(table, out / "compare.png")
    return table


def judge_header(judge) -> str:
    """Return the table header sentence: the judge's name and its measured agreement with human labels."""
    from .evaluate import describe_judge

    return describe_judge(_judge_label(judge) or "none", getattr(judge, "agreement", None))


def _judge_label(judge) -> Optional[str]:
    if judge is None:
        return None
    try:
        from .judges import judge_name
    except ImportError:
        return type(judge).__name__
    return judge_name(judge)


def _callable_name(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


# ----------------------------------------------------------------------
# lambda sweep


def parse_lambdas(text) -> list:
    """Parse "0,0.5,1" or "start:stop:step" (stop included) or a list into sorted, distinct, finite lambdas."""
    if isinstance(text, str):
        text = text.strip()
        if ":" in text:
            values = _parse_range(text)
        else:
            values = [_parse_float(part, "lambda") for part in text.split(",") if part.strip()]
    else:
        values = [_parse_float(value, "lambda") for value in text]
    if not values:
        raise ValueError("the list of lambdas is empty; give at least one, e.g. 0,0.5,1")
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"lambda must be a finite number, got {value}")
    return sorted(set(values))


def _parse_float(value, label: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None


def _parse_range(text: str) -> list:
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"a lambda range has the form start:stop:step, got {text!r}")
    start, stop, step = (_parse_float(part, "lambda range value") for part in parts)
    if not all(math.isfinite(value) for value in (start, stop, step)):
        raise ValueError(f"lambda range {text!r} must contain finite numbers")
    if step <= 0:
        raise ValueError(f"lambda range step must be > 0, got {step}")
    if stop < start:
        raise ValueError(f"lambda range {text!r} ends before it starts")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    # Rounding keeps 0.1-style steps from printing as 0.30000000000000004.
    return [round(start + i * step, 12) for i in range(count)]


@dataclass
class SweepResult:
    """Metrics of each lambda (rows of table, with a "lambda" column) and the chosen lambda."""

    table: Table
    harm_metric: Optional[str]
    utility_metric: Optional[str]
    chosen_lambda: Optional[float] = None
    budget: Optional[str] = None
    files: dict = field(default_factory=dict)

    @property
    def results(self) -> list:
        return self.table.rows


def read_run_config(run_dir: PathLike) -> SKUConfig:
    """Return the SKUConfig stored in a run folder's manifest.json; raises FileNotFoundError when it is missing."""
    manifest_path = Path(run_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; RUN must be an output folder of `skupy unlearn` "
                                "or of a method in `skupy compare` (runs/METHOD)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return SKUConfig.from_dict(manifest["config"])


def load_run(run_dir: PathLike, model=None) -> tuple:
    """Read an SKU run folder: returns (SKUConfig, (ModelConfig, params, tokenizer), TaskVector).

    The base model is loaded from the config's model name unless model is
    given. Raises FileNotFoundError when the folder or its task vector is
    missing, and ValueError for a run of a method that does not end with
    negation.
    """
    run = Path(run_dir)
    config = read_run_config(run)
    tv_path = run / "task_vector.safetensors"
    if not tv_path.is_file():
        if (run / "weight_delta.safetensors").is_file():
            manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
            negating = ", ".join(name for name, cls in METHODS.items() if cls.negates)
            raise ValueError(f"{run} is a run of method {manifest.get('method', 'unknown')!r}, which does not end "
                             f"with negation, so it has no task vector to scale; sweep a run of {negating}")
        raise FileNotFoundError(f"{tv_path} not found; was the run interrupted before it finished?")
    if model is None:
        from .checkpoint import load_checkpoint

        model = load_checkpoint(config.model)
    return config, model, TaskVector.load(tv_path)


def sweep_lambda(source, lambdas, data=None, judge=None, eval_settings=None, out_dir: Optional[PathLike] = None,
                 *, model=None, evaluate: Optional[Callable] = None, utility_budget=None,
                 harm_metric: Optional[str] = None, utility_metric: Optional[str] = None) -> SweepResult:
    """Evaluate theta_0 - lambda * tau for each lambda; lambda = 0 (the original model) is always included.

    source: an SKU run folder (its task_vector.safetensors and manifest.json are
    read, and the base model is loaded unless model is given), or a pair
    (base, task_vector) where base is a skupy Model or a (ModelConfig, params,
    tokenizer) tuple. With utility_budget (see choose_lambda) the result names
    the chosen lambda. With out_dir, writes sweep.csv, sweep.md, sweep.json and
    tradeoff.png there.
    """
    values = parse_lambdas(lambdas)
    if 0.0 not in values:
        values = sorted(values + [0.0])
    budget = parse_budget(utility_budget) if utility_budget is not None else None

    config = None
    if isinstance(source, (str, Path)):
        config, model, task_vector = load_run(source, model)
    else:
        base, task_vector = source
        model = (base.config, base.params, base.tokenizer) if isinstance(base, Model) else base
    base_config, base_params, tokenizer = model
    if data is None:
        from .data import load_sku_data

        data = load_sku_data(config.data_dir if config else None, seed=config.seed if config else 0)
    evaluate = evaluate or default_evaluator()
    judge = judge if judge is not None else default_judge()
    out = Path(out_dir) if out_dir is not None else None

    original = Model(base_config, base_params, trainable=[], tokenizer=tokenizer)
    table = Table(header=judge_header(judge))
    for value in values:
        if value == 0.0:
            candidate = original
        else:
            candidate = Model(base_config, task_vector.negate_into(base_params, value), trainable=[],
                              tokenizer=tokenizer)
        started = time.perf_counter()
        results = run_evaluator(evaluate, candidate, data, judge, original, eval_settings)
        table.rows.append({"lambda": value, **metric_values(results), "eval_seconds": time.perf_counter() - started})
        if out is not None:
            save_evaluation(results, out / f"lambda_{value:g}")
        logger.info("lambda %g: %s", value, metric_values(results))

    available = table.numeric_columns()
    if harm_metric is not None:
        harm_metric = _metric_key(table.rows[0], harm_metric)
    else:
        harm_metric = next((name for name in HARM_METRICS if name in available), None)
    if utility_metric is not None:
        utility_metric = _metric_key(table.rows[0], utility_metric)
    else:
        utility_metric = next((name for name in UTILITY_METRICS if name in available), None)
    result = SweepResult(table, harm_metric, utility_metric, budget=_budget_text(budget))
    if budget is not None:
        result.chosen_lambda = choose_lambda(table.rows, budget)

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        extra = {"harm_metric": harm_metric, "utility_metric": utility_metric, "budget": result.budget,
                 "chosen_lambda": result.chosen_lambda, "source": str(source) if config else None}
        result.files = write_table(table, out, "sweep", extra)
        if harm_metric and utility_metric:
            plot_tradeoff(table.rows, harm_metric, utility_metric, out / "tradeoff.png", result.chosen_lambda)
            result.files["plot"] = out / "tradeoff.png"
        else:
            logger.warning("no harm and utility metric pair to plot among %s", ", ".join(available))
    return result


def plot_tradeoff(results: Sequence[dict], harm_metric: str, utility_metric: str, path: PathLike,
                  chosen_lambda: Optional[float] = None) -> None:
    """Plot the harm metric against the utility metric, one labelled point per lambda, into a PNG."""
    plt = _pyplot()
    points = [(row["lambda"], row.get(utility_metric), row.get(harm_metric)) for row in results]
    points = [(lam, x, y) for lam, x, y in points if _is_number(x) and _is_number(y)
              and math.isfinite(x) and math.isfinite(y)]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.plot([x for _, x, _ in points], [y for _, _, y in points], "-o", color="C0")
    for lam, x, y in points:
        axis.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if chosen_lambda is not None and lam == chosen_lambda:
            axis.plot([x], [y], "*", color="C3", markersize=16, label=f"chosen λ = {lam:g}")
    axis.set_xlabel(utility_metric + _direction_hint(utility_metric))
    axis.set_ylabel(harm_metric + _direction_hint(harm_metric))
    axis.margins(0.15)
    axis.set_title("Knowledge negation: θ₀ − λτ")
    if chosen_lambda is not None:
        axis.legend()
    figure.tight_layout()
    _save_figure(figure, Path(path))


def _direction_hint(metric: str) -> str:
    direction = metric_direction(metric)
    if direction is None:
        return ""
    return " (higher is better)" if direction > 0 else " (lower is better)"


# ----------------------------------------------------------------------
# choosing lambda under a utility budget


@dataclass(frozen=True)
class BudgetItem:
    """Largest allowed utility loss on one metric, in the unit the budget was written in.

    The unit is percent of the baseline when ``relative``, percentage points
    when ``points`` (a plain number for a fraction metric), and otherwise the
    metric's own unit.
    """

    metric: str
    amount: float
    relative: bool = False
    points: bool = False

    def __str__(self) -> str:
        return f"{self.metric}={self.amount:g}{'%' if self.relative else ''}"


def canonical_metric(name: str) -> str:
    """Return the metric that name stands for: its last dotted part, with METRIC_ALIASES resolved."""
    last = name.rsplit(".", 1)[-1]
    return METRIC_ALIASES.get(last, last)


def metric_direction(metric: str) -> Optional[int]:
    """Return +1 when higher values of metric are better, -1 when lower are better, None when unknown."""
    return METRIC_DIRECTIONS.get(canonical_metric(metric))


def parse_budget(budget) -> list:
    """Parse "mc2=2,fluency=10%" (or a dict of the same) into BudgetItems.

    "N%" allows a loss of N percent of the baseline value. A plain number is
    in percentage points for metrics reported as fractions (FRACTION_METRICS,
    so mc2=2 allows MC2 to drop from 0.40 to 0.38) and in the metric's own
    unit for the others (fluency=1.5 allows the perplexity to rise by 1.5).
    Loss means a drop for metrics where higher is better and a rise for the
    others.
    """
    if isinstance(budget, (list, tuple)) and all(isinstance(item, BudgetItem) for item in budget):
        return list(budget)
    if isinstance(budget, dict):
        entries = [(str(key), str(value)) for key, value in budget.items()]
    elif isinstance(budget, str):
        entries = []
        for part in budget.split(","):
            if not part.strip():
                continue
            key, separator, value = part.partition("=")
            if not separator:
                raise ValueError(f"utility budget entry {part.strip()!r} must have the form metric=amount, "
                                 "e.g. mc2=2 or fluency=10%")
            entries.append((key.strip(), value.strip()))
    else:
        raise ValueError(f"utility budget must be a string like 'mc2=2,fluency=10%' or a dict, got {budget!r}")
    if not entries:
        raise ValueError("the utility budget is empty; give at least one metric=amount, e.g. mc2=2")

    items = []
    for metric, text in entries:
        if metric_direction(metric) is None:
            raise ValueError(f"utility budget metric {metric!r} has no known direction; known metrics: "
                             f"{', '.join(METRIC_DIRECTIONS)} and the short names {', '.join(METRIC_ALIASES)}")
        relative = text.endswith("%")
        amount = _parse_float(text[:-1] if relative else text, f"utility budget for {metric}")
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"utility budget for {metric} must be a finite number >= 0, got {text!r}")
        if any(canonical_metric(item.metric) == canonical_metric(metric) for item in items):
            raise ValueError(f"utility budget names {metric!r} twice")
        points = not relative and canonical_metric(metric) in FRACTION_METRICS
        items.append(BudgetItem(metric, amount, relative, points))
    return items


def _budget_text(items) -> Optional[str]:
    if items is None:
        return None
    return ",".join(str(item) for item in items)


def utility_losses(result: dict, baseline: dict, budget) -> dict:
    """Return {metric: loss} of result against baseline, each in its budget item's unit.

    The loss is NaN when the result lacks the metric or its value is not finite.
    """
    losses = {}
    for item in parse_budget(budget):
        key = _metric_key(baseline, item.metric)
        value, reference = result.get(key), baseline[key]
        if not (_is_number(value) and _is_number(reference)) or not math.isfinite(value):
            losses[item.metric] = math.nan
            continue
        loss = (reference - value) if metric_direction(item.metric) > 0 else (value - reference)
        if item.points:
            loss = 100.0 * loss
        elif item.relative:
            if reference != 0:
                loss = 100.0 * loss / abs(reference)
            elif loss > 0:
                loss = math.inf  # any loss is infinitely many percent of a zero baseline
            else:
                loss = 0.0
        losses[item.metric] = loss
    return losses


def _metric_key(row: dict, metric: str) -> str:
    """Find metric in a row: the exact key, else the one key that stands for the same metric."""
    if metric in row:
        return metric
    matches = [key for key in row if isinstance(key, str) and canonical_metric(key) == canonical_metric(metric)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"metric {metric!r} is not in the results; available: {', '.join(map(str, row))}")
    raise ValueError(f"metric {metric!r} is ambiguous in the results: {', '.join(matches)}")


def choose_lambda(results: Sequence[dict], utility_budget, baseline: Optional[dict] = None) -> float:
    """Return the largest lambda whose utility loss against the baseline stays within every budget item.

    results: dicts with a "lambda" key and metric keys. baseline defaults to
    the result with lambda == 0. A result with a missing or non-finite value
    of a budget metric does not qualify.
    """
    if not results:
        raise ValueError("no results to choose lambda from")
    items = parse_budget(utility_budget)
    for row in results:
        if "lambda" not in row:
            raise ValueError(f"every result needs a 'lambda' key; got keys {', '.join(map(str, row))}")
    if baseline is None:
        baseline = next((row for row in results if row["lambda"] == 0), None)
        if baseline is None:
            raise ValueError("no result has lambda = 0 to serve as the baseline; pass baseline= or add lambda 0")
    for item in items:
        key = _metric_key(baseline, item.metric)
        if not (_is_number(baseline[key]) and math.isfinite(baseline[key])):
            raise ValueError(f"the baseline value of {key} is {baseline[key]!r}; cannot measure a utility loss")

    qualifying = []
    for row in results:
        losses = utility_losses(row, baseline, items)
        if all(math.isfinite(loss) and loss <= item.amount + 1e-12 for item, loss in zip(items, losses.values())):
            qualifying.append(float(row["lambda"]))
    if not qualifying:
        raise ValueError(f"no lambda keeps the utility loss within {_budget_text(items)}")
    return max(qualifying)
