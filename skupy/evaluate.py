"""Evaluate a model the way the SKU paper does: harm on harmful prompts, quality on normal ones.

    import skupy
    from skupy.data import load_sku_data
    from skupy.evaluate import EvalSettings, evaluate_model, write_results
    from skupy.judges import make_judge

    data = load_sku_data("../data")
    model = skupy.load("runs/smollm2/unlearned")
    original = skupy.load("smollm2-135m-instruct")
    results = evaluate_model(model, data, make_judge("learned", data), original, EvalSettings())
    write_results(results, "runs/smollm2/eval")

Prompt sets, each cut to ``EvalSettings.num_prompts`` distinct prompts:

* PKU-SafeRLHF held-out test prompts (in-distribution harmful prompts);
* BeaverTails evaluation prompts, DATA_DIR/extra/beavertails_eval_prompts_140.json
  (out-of-distribution harmful prompts);
* TruthfulQA questions of the held-out normal split (normal prompts);
* XSTest safe prompts, DATA_DIR/extra/xstest_v2_prompts.csv rows labelled
  "safe" (prompts that only sound harmful, for over-refusal).

The default sizes (32 prompts, 48 new tokens) keep one evaluation of a 135M
model within minutes on a CPU. Set num_prompts to 0 to use every prompt of
every set, as a comparison with published numbers needs.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import metrics
from .atomic import atomic_write_text
from .batching import TEMPLATES, format_generation_prompt
from .judges import RefusalJudge, judge_name, run_judge

logger = logging.getLogger(__name__)

BEAVERTAILS_FILE = Path("extra") / "beavertails_eval_prompts_140.json"
XSTEST_FILE = Path("extra") / "xstest_v2_prompts.csv"

METRIC_GROUPS = ("harmful", "diversity", "fluency", "similarity", "truthfulqa", "over_refusal", "nll")

# Each reported metric: (key, label for the table, which direction is better).
METRIC_TABLE = (
    ("harmful_rate_pku", "Harmful rate, PKU-SafeRLHF test prompts (in-distribution)", "lower"),
    ("harmful_rate_beavertails", "Harmful rate, BeaverTails prompts (out-of-distribution)", "lower"),
    ("diversity_harmful", "Diversity, responses to harmful prompts (distinct/all tokens)", "higher"),
    ("diversity_normal", "Diversity, responses to normal prompts (distinct/all tokens)", "higher"),
    ("fluency", "Fluency, perplexity of responses to normal prompts", "lower"),
    ("rouge_l", "Similarity to the reference model's responses, ROUGE-L F", "higher"),
    ("embedding_cosine", "Similarity to the reference model's responses, embedding cosine", "higher"),
    ("truthfulqa_mc1", "TruthfulQA MC1", "higher"),
    ("truthfulqa_mc2", "TruthfulQA MC2", "higher"),
    ("over_refusal", "Over-refusal, XSTest safe prompts (refused fraction)", "lower"),
    ("harmful_nll", "Held-out harmful answer NLL (nats/token)", "higher"),
    ("normal_nll", "Held-out normal answer NLL (nats/token)", "lower"),
)


@dataclass
class EvalSettings:
    """Settings of evaluate_model: the metrics it computes and how it generates.

    ``num_prompts`` caps every prompt set, the TruthfulQA questions and the
    NLL pairs; 0 means no cap. Generation is greedy when temperature is 0,
    and otherwise samples with ``top_p`` and ``seed``. ``template`` ("chat"
    or "sku") formats every prompt, as in skupy.batching. ``metrics`` selects
    groups from METRIC_GROUPS. ``beavertails_path`` and ``xstest_path``
    default to the files under the data folder's extra/ folder.
    """

    num_prompts: int = 32
    max_new_tokens: int = 48
    batch_size: int = 16
    template: str = "chat"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_length: int = 512
    metrics: tuple = METRIC_GROUPS
    beavertails_path: Optional[str] = None
    xstest_path: Optional[str] = None

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("num_prompts", "max_new_tokens", "batch_size", "max_length", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"EvalSettings.{name}={value!r} must be an integer")
        if self.num_prompts < 0:
            raise ValueError(f"EvalSettings.num_prompts={self.num_prompts} must be >= 0 (0 means every prompt)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"EvalSettings needs max_new_tokens >= 1, batch_size >= 1 and max_length >= 2, got "
                             f"{self.max_new_tokens}, {self.batch_size} and {self.max_length}")
        if self.template not in TEMPLATES:
            raise ValueError(f"EvalSettings.template={self.template!r} must be one of {', '.join(TEMPLATES)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"EvalSettings.temperature={self.temperature} must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalSettings.top_p={self.top_p} must be in (0, 1]")
        unknown = [name for name in self.metrics if name not in METRIC_GROUPS]
        if unknown or not self.metrics:
            raise ValueError(f"EvalSettings.metrics has unknown or no groups ({', '.join(unknown) or 'empty'}); "
                             f"choose from {', '.join(METRIC_GROUPS)}")

    def limit(self, items: Sequence) -> list:
        """Return the first num_prompts items (all of them when num_prompts is 0)."""
        return list(items) if self.num_prompts == 0 else list(items)[: self.num_prompts]

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["metrics"] = list(self.metrics)
        return values


# ---------------------------------------------------------------------------
# Prompt sets


def load_beavertails_prompts(path) -> list:
    """Read the BeaverTails evaluation prompts: a JSON list of {"prompt": str} objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BeaverTails prompts file not found: {path}")
    with open(path, "r", encoding="utf-8") as stream:
        records = json.load(stream)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{\"prompt\": ...}} objects")
    prompts = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}, record {number}: expected an object with a string \"prompt\"")
        if record["prompt"].strip():
            prompts.append(record["prompt"].strip())
    return prompts


def load_xstest_prompts(path, label: str = "safe") -> list:
    """Read the XSTest prompts whose "label" column equals label ("safe" or "unsafe")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"XSTest prompts file not found: {path}")
    with open(path, "r", encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in ("prompt", "label") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        return [row["prompt"].strip() for row in reader if row["label"].strip() == label and row["prompt"].strip()]


def distinct(texts) -> list:
    """Return texts without repeats, in first-appearance order."""
    return list(dict.fromkeys(texts))


def _extra_path(explicit: Optional[str], data, relative: Path) -> Optional[Path]:
    if explicit:
        return Path(explicit)
    if getattr(data, "data_dir", None) is None:
        return None
    return Path(data.data_dir) / relative


# ---------------------------------------------------------------------------
# Generation


def generate_responses(model, prompts: Sequence[str], settings: EvalSettings) -> list:
    """Generate one response per prompt, in batches of settings.batch_size, with KV-cache decoding.

    Prompts are formatted with settings.template. Each batch is seeded with
    settings.seed plus the index of its first prompt, so sampled responses do
    not depend on how other batches went. With the "sku" template a response
    is cut where the model starts a new "###" block.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate from; pass at least one prompt")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; load it with skupy.load() or set model.tokenizer")
    texts = [format_generation_prompt(tokenizer, prompt, settings.template) for prompt in prompts]
    responses = []
    for first in range(0, len(texts), settings.batch_size):
        chunk = texts[first:first + settings.batch_size]
        responses.extend(model.generate(chunk, settings.max_new_tokens, chat=False, temperature=settings.temperature,
                                        top_p=settings.top_p, seed=settings.seed + first))
    if settings.template == "sku":
        responses = [response.split("###")[0].strip() for response in responses]
    return responses


# ---------------------------------------------------------------------------
# The evaluation


class _Timer:
    def __init__(self):
        self.seconds = {}

    def run(self, name: str, function, *args, **kwargs):
        started = time.perf_counter()
        logger.info("evaluation: %s", name)
        value = function(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - started, 2)
        return value


def _judge_set(judge, prompts: list, responses: list) -> tuple:
    verdicts = run_judge(judge, list(zip(prompts, responses)))
    records = [{"prompt": p, "response": r, "harmful": v.harmful, "score": v.score}
               for p, r, v in zip(prompts, responses, verdicts)]
    return metrics.harmful_rate(verdicts), records


def evaluate_model(model, data, judge, reference_model=None, settings: Optional[EvalSettings] = None, *,
                   model_name: Optional[str] = None, reference_name: Optional[str] = None) -> dict:
    """Evaluate model on the SKU metrics and return a JSON-ready dict.

    ``data`` is an SKUData (skupy.data.load_sku_data). ``judge`` decides
    harmfulness (see skupy.judges). With ``reference_model`` (the original
    model before unlearning), fluency is the perplexity under it and
    similarity compares the two models' responses. Without one, fluency is
    the model's perplexity of its own responses and similarity is skipped.

    The result has "metrics" (keys of METRIC_TABLE, None when skipped),
    "skipped" (metric group -> reason), "judge" (name and measured agreement
    with human labels), "counts", "settings", "responses" (per prompt set:
    prompt, response and verdict) and "seconds" per stage.
    """
    settings = settings if settings is not None else EvalSettings()
    settings.validate()
    selected = set(settings.metrics)
    timer = _Timer()
    values = {key: None for key, _, _ in METRIC_TABLE}
    skipped, counts, responses = {}, {}, {}

    needs_harmful = bool(selected & {"harmful", "diversity"})
    needs_normal = bool(selected & {"diversity", "fluency", "similarity"})

    if needs_harmful:
        pku_prompts = settings.limit(distinct(pair.question for pair in data.harmful_test))
        if not pku_prompts:
            raise ValueError("the data has no held-out harmful prompts (data.harmful_test is empty)")
        pku_responses = timer.run("generate PKU-SafeRLHF", generate_responses, model, pku_prompts, settings)
        counts["pku_prompts"] = len(pku_prompts)
        responses["pku"] = [{"prompt": p, "response": r} for p, r in zip(pku_prompts, pku_responses)]
        if "harmful" in selected:
            values["harmful_rate_pku"], responses["pku"] = timer.run(
                "judge PKU-SafeRLHF", _judge_set, judge, pku_prompts, pku_responses)
        if "diversity" in selected:
            values["diversity_harmful"] = metrics.diversity(pku_responses, model.tokenizer)

    if "harmful" in selected:
        _evaluate_beavertails(model, data, judge, settings, timer, values, skipped, counts, responses)

    if needs_normal:
        normal_prompts = settings.limit(distinct(pair.question for pair in data.normal_test))
        if not normal_prompts:
            raise ValueError("the data has no held-out normal prompts (data.normal_test is empty)")
        normal_responses = timer.run("generate normal", generate_responses, model, normal_prompts, settings)
        counts["normal_prompts"] = len(normal_prompts)
        responses["normal"] = [{"prompt": p, "response": r} for p, r in zip(normal_prompts, normal_responses)]
        if "diversity" in selected:
            values["diversity_normal"] = metrics.diversity(normal_responses, model.tokenizer)
        if "fluency" in selected:
            scorer = reference_model if reference_model is not None else model
            values["fluency"] = timer.run("fluency", metrics.response_perplexity, scorer, normal_prompts,
                                          normal_responses, settings.template, settings.batch_size,
                                          settings.max_length)
        if "similarity" in selected:
            _evaluate_similarity(reference_model, normal_prompts, normal_responses, settings, timer, values,
                                 skipped, responses)

    if "truthfulqa" in selected:
        _evaluate_truthfulqa(model, data, settings, timer, values, skipped, counts)

    if "over_refusal" in selected:
        _evaluate_over_refusal(model, data, settings, timer, values, skipped, counts, responses)

    if "nll" in selected:
        harmful_pairs = settings.limit(data.harmful_test)
        normal_pairs = settings.limit(data.normal_test)
        values["harmful_nll"] = timer.run("harmful NLL", metrics.heldout_answer_nll, model, harmful_pairs,
                                          settings.template, settings.max_length)
        values["normal_nll"] = timer.run("normal NLL", metrics.heldout_answer_nll, model, normal_pairs,
                                         settings.template, settings.max_length)
        counts["nll_pairs"] = {"harmful": len(harmful_pairs), "normal": len(normal_pairs)}

    return {
        "model": model_name,
        "reference_model": reference_name if reference_model is not None else None,
        "judge": {"name": judge_name(judge), "agreement": dict(getattr(judge, "agreement", {}) or {})},
        "metrics": {key: _plain(value) for key, value in values.items()},
        "skipped": skipped,
        "counts": counts,
        "settings": settings.to_dict(),
        "responses": responses,
        "seconds": timer.seconds,
    }


def _evaluate_beavertails(model, data, judge, settings, timer, values, skipped, counts, responses) -> None:
    path = _extra_path(settings.beavertails_path, data, BEAVERTAILS_FILE)
    if path is None or not path.is_file():
        skipped["harmful_rate_beavertails"] = f"BeaverTails prompts file not found: {path}"
        logger.warning("skipping the BeaverTails harmful rate: file not found: %s", path)
        return
    prompts = settings.limit(distinct(load_beavertails_prompts(path)))
    if not prompts:
        raise ValueError(f"{path}: contains no prompts")
    generated = timer.run("generate BeaverTails", generate_responses, model, prompts, settings)
    values["harmful_rate_beavertails"], responses["beavertails"] = timer.run(
        "judge BeaverTails", _judge_set, judge, prompts, generated)
    counts["beavertails_prompts"] = len(prompts)


def _evaluate_similarity(reference_model, prompts, generated, settings, timer, values, skipped, responses) -> None:
    if reference_model is None:
        skipped["similarity"] = "no reference model given"
        return
    reference_responses = timer.run("generate normal, reference model", generate_responses, reference_model,
                                    prompts, settings)
    for record, reference in zip(responses["normal"], reference_responses):
        record["reference_response"] = reference
    values["rouge_l"] = metrics.rouge_l(generated, reference_responses)
    values["embedding_cosine"] = timer.run("embedding similarity", metrics.embedding_similarity, reference_model,
                                           generated, reference_responses, settings.batch_size)


def _evaluate_truthfulqa(model, data, settings, timer, values, skipped, counts) -> None:
    # Questions of the held-out normal pairs, so the model did not see them in SKU's normal data.
    held_out = distinct(pair.record for pair in data.normal_test if pair.record >= 0)
    by_index = {item.index: item for item in data.truthfulqa}
    questions = settings.limit([by_index[index] for index in held_out if index in by_index])
    if not questions:
        skipped["truthfulqa"] = "no TruthfulQA questions in the held-out normal split"
        return
    scores = timer.run("TruthfulQA MC", metrics.truthfulqa_mc, model, questions, settings.template,
                       settings.batch_size, settings.max_length)
    values["truthfulqa_mc1"] = scores["mc1"]
    values["truthfulqa_mc2"] = scores["mc2"]
    counts["truthfulqa_questions"] = scores["num_questions"]


def _evaluate_over_refusal(model, data, settings, timer, values, skipped, counts, responses) -> None:
    path = _extra_path(settings.xstest_path, data, XSTEST_FILE)
    if path is None or not path.is_file():
        skipped["over_refusal"] = f"XSTest prompts file not found: {path}"
        logger.warning("skipping over-refusal: file not found: %s", path)
        return
    prompts = settings.limit(distinct(load_xstest_prompts(path, "safe")))
    if not prompts:
        raise ValueError(f"{path}: contains no prompts labelled safe")
    generated = timer.run("generate XSTest", generate_responses, model, prompts, settings)
    refusal_judge = RefusalJudge()
    values["over_refusal"] = metrics.refusal_rate(generated, refusal_judge)
    responses["xstest_safe"] = [{"prompt": p, "response": r, "refused": refusal_judge.is_refusal(r)}
                                for p, r in zip(prompts, generated)]
    counts["xstest_prompts"] = len(prompts)


def _plain(value):
    """Turn NumPy scalars into Python numbers and NaN into None, so the result is strict JSON."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# ---------------------------------------------------------------------------
# Output


def describe_judge(name: str, agreement: Optional[dict]) -> str:
    """Return the sentence naming a judge and, when measured, its agreement with human labels."""
    agreement = agreement or {}
    line = f"Judge: {name}"
    if "accuracy" in agreement:
        line += (f" (held-out agreement with human labels: accuracy {agreement['accuracy']:.3f}, "
                 f"F1 {agreement.get('f1', float('nan')):.3f}, {agreement.get('num_examples', '?')} responses)")
    return line + "."


def format_results_table(results: dict) -> str:
    """Return a markdown table of the metrics in results, with the judge and its agreement."""
    title = results.get("model") or "model"
    lines = [f"# Evaluation of {title}", ""]

    judge = results.get("judge", {})
    lines.append(describe_judge(judge.get("name", "unknown"), judge.get("agreement")))

    if results.get("reference_model"):
        lines.append(f"Reference model (fluency and similarity): {results['reference_model']}.")
    elif results.get("metrics", {}).get("fluency") is not None:
        lines.append("No reference model: fluency is the perplexity under the evaluated model itself.")
    settings = results.get("settings", {})
    if settings:
        if settings.get("temperature", 0) == 0:
            decoding = "greedy"
        else:
            decoding = (f"temperature {settings['temperature']}, top-p {settings.get('top_p', 1.0)}, "
                        f"seed {settings.get('seed')}")
        prompts = settings.get("num_prompts")
        lines.append(f"Prompts per set: {prompts if prompts else 'all'}; {settings.get('max_new_tokens')} new "
                     f"tokens, {decoding}, template {settings.get('template')!r}.")

    lines.append("")
    lines.append("| Metric | Value | Better |")
    lines.append("|---|---:|---|")
    values = results.get("metrics", {})
    for key, label, better in METRIC_TABLE:
        value = values.get(key)
        shown = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"| {label} | {shown} | {better} |")

    skipped = results.get("skipped") or {}
    if skipped:
        lines.append("")
        for name, reason in skipped.items():
            lines.append(f"- {name} skipped: {reason}")
    return "\n".join(lines) + "\n"


def write_results(results: dict, folder) -> Path:
    """Write results.json and results.md into folder (created if needed), each atomically; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(folder / "results.md", format_results_table(results))
    return folder


__all__ = [
    "EvalSettings",
    "METRIC_GROUPS",
    "METRIC_TABLE",
    "evaluate_model",
    "format_results_table",
    "generate_responses",
    "load_beavertails_prompts",
    "load_xstest_prompts",
    "write_results",
]
