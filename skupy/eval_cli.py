"""The `skupy eval` command: evaluate an SKU run or any model and write results.json and results.md."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .batching import TEMPLATES


def register_commands(subparsers, add_runtime_options) -> None:
    """Add the `eval` subcommand to an argparse subparsers object."""
    from .evaluate import METRIC_GROUPS, EvalSettings
    from .judges import JUDGE_NAMES

    defaults = EvalSettings()
    command = subparsers.add_parser(
        "eval", help="evaluate an unlearned model: harmful rate, diversity, fluency, similarity, TruthfulQA",
        description="Evaluate RUN_OR_MODEL and write results.json and results.md. RUN_OR_MODEL is an SKU "
                    "run folder (its unlearned/ model is evaluated against the original model named in its "
                    "manifest.json) or a model name, .gguf file or Hugging Face folder.")
    command.add_argument("target", metavar="RUN_OR_MODEL", help="SKU run folder, model name or model path")
    command.add_argument("--judge", default="learned",
                         help=f"safety judge: {' or '.join(JUDGE_NAMES)}, or the path of a saved learned "
                              "judge (.npz) or a Hugging Face classifier folder (default: %(default)s)")
    command.add_argument("--judge-cache", default=None,
                         help="folder where the trained learned judge is cached (default: $SKUPY_CACHE_DIR, "
                              "else ~/.cache/skupy)")
    command.add_argument("--reference", default=None,
                         help="original model for fluency and similarity (default: the run's model for a run "
                              "folder, none otherwise)")
    command.add_argument("--no-reference", action="store_true",
                         help="evaluate without a reference model, even for a run folder")
    command.add_argument("--data-dir", default=None,
                         help="folder with pku-saferlhf/, truthfulqa/ and extra/ (default: $SKUPY_DATA_DIR)")
    command.add_argument("--out", default=None,
                         help="output folder (default: RUN/eval for a run folder, eval-NAME otherwise)")
    command.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                         help="prompts per prompt set, TruthfulQA questions and NLL pairs; 0 means all "
                              "(default: %(default)s)")
    command.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                         help="maximum tokens generated per response (default: %(default)s)")
    command.add_argument("--batch-size", type=int, default=defaults.batch_size,
                         help="prompts generated and scored together (default: %(default)s)")
    command.add_argument("--template", choices=TEMPLATES, default=None,
                         help="prompt format; default: the run's training template for a run folder, "
                              f"{defaults.template!r} otherwise")
    command.add_argument("--temperature", type=float, default=defaults.temperature,
                         help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    command.add_argument("--top-p", type=float, default=defaults.top_p,
                         help="nucleus sampling probability mass; 1 is off (default: %(default)s)")
    command.add_argument("--seed", type=int, default=defaults.seed, help="random seed for sampling")
    command.add_argument("--metrics", default=",".join(METRIC_GROUPS),
                         help="comma-separated metric groups to compute (default: %(default)s)")
    add_runtime_options(command)
    command.set_defaults(handler=run_eval)


def resolve_target(target: str, reference: str = None, no_reference: bool = False) -> dict:
    """Work out what `skupy eval TARGET` evaluates.

    Returns {"model": path or name to load, "reference": name or None,
    "run": run folder or None, "template": the run's template or None}.
    A folder containing unlearned/ is an SKU run: its reference defaults to
    the "model" field of its manifest.json.
    """
    path = Path(target).expanduser()
    resolved = {"model": target, "reference": reference, "run": None, "template": None}
    if path.is_dir() and (path / "unlearned").is_dir():
        resolved["model"] = str(path / "unlearned")
        resolved["run"] = str(path)
        manifest_path = path / "manifest.json"
        manifest = {}
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest_path}: invalid JSON ({error.msg} at line {error.lineno})") from None
        if reference is None and not no_reference:
            if not manifest.get("model"):
                raise ValueError(f"{path} is an SKU run without a \"model\" field in manifest.json; pass "
                                 "--reference MODEL or --no-reference")
            resolved["reference"] = manifest["model"]
        resolved["template"] = (manifest.get("config") or {}).get("template")
    if no_reference:
        resolved["reference"] = None
    return resolved


def default_out_dir(resolved: dict) -> Path:
    """Return RUN/eval for a run, else eval-NAME in the working folder with NAME made file-safe."""
    if resolved["run"] is not None:
        return Path(resolved["run"]) / "eval"
    name = Path(resolved["model"]).name or "model"
    return Path(f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}")


def run_eval(args) -> int:
    import skupy
    from .data import load_sku_data
    from .evaluate import EvalSettings, evaluate_model, format_results_table, write_results
    from .judges import make_judge

    resolved = resolve_target(args.target, args.reference, args.no_reference)
    metric_groups = tuple(name.strip() for name in args.metrics.split(",") if name.strip())
    settings = EvalSettings(num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, template=args.template or resolved["template"] or "chat",
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            metrics=metric_groups)
    data = load_sku_data(args.data_dir)
    judge = make_judge(args.judge, data, args.judge_cache)
    model = skupy.load(resolved["model"])
    reference = skupy.load(resolved["reference"]) if resolved["reference"] else None

    results = evaluate_model(model, data, judge, reference, settings, model_name=resolved["model"],
                             reference_name=resolved["reference"])
    out = Path(args.out) if args.out else default_out_dir(resolved)
    write_results(results, out)
    print(format_results_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


__all__ = ["default_out_dir", "register_commands", "resolve_target", "run_eval"]
