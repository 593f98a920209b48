"""The `skupy compare` and `skupy sweep-lambda` subcommands.

skupy.cli adds them when this module is listed in its EXTRA_COMMAND_MODULES.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .compare import (DEFAULT_METHODS, compare, default_eval_settings, parse_budget, parse_lambdas,
                      sweep_lambda)
from .methods import METHODS, parse_method_names

DEFAULT_LAMBDAS = "0,0.25,0.5,0.75,1,1.25,1.5,1.75,2"


def register_commands(subparsers, add_runtime_options) -> None:
    """Add the compare and sweep-lambda subcommands to the `skupy` parser."""
    from .sku_config import describe_presets

    method_lines = "\n".join(f"  {name}: {cls.summary}" for name, cls in METHODS.items())
    compare_parser = subparsers.add_parser(
        "compare", help="train several unlearning methods with one config and compare them",
        epilog=f"methods:\n{method_lines}\n\npresets:\n{describe_presets()}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    compare_parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                                help="comma-separated method names, listed below (default: %(default)s)")
    compare_parser.add_argument("--preset", default=None, help="start from a named preset (listed below)")
    compare_parser.add_argument("--config", default=None, help="YAML or JSON file with SKUConfig fields")
    compare_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                                help="override one config field for every method, e.g. --set max_unlearn_steps=20 "
                                     "(repeatable)")
    compare_parser.add_argument("--model", default=None, help="model name or path (overrides the config)")
    compare_parser.add_argument("--data-dir", default=None,
                                help="folder with pku-saferlhf/ and truthfulqa/ (default: $SKUPY_DATA_DIR)")
    compare_parser.add_argument("--out", required=True,
                                help="output folder for the table (compare.csv, .md, .json), compare.png and runs/")
    _add_evaluation_options(compare_parser)
    compare_parser.add_argument("--save-models", action="store_true",
                                help="also write each method's final model as a Hugging Face folder "
                                     "(runs/METHOD/unlearned)")
    compare_parser.add_argument("--recompute", action="store_true",
                                help="recompute activations in backward to save memory")
    compare_parser.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    add_runtime_options(compare_parser)
    compare_parser.set_defaults(handler=run_compare)

    sweep_parser = subparsers.add_parser(
        "sweep-lambda", help="evaluate theta_0 - lambda * tau of an SKU run for several lambdas")
    sweep_parser.add_argument("run", help="output folder of `skupy unlearn` (or runs/METHOD of `skupy compare`)")
    sweep_parser.add_argument("--lambdas", default=DEFAULT_LAMBDAS,
                              help="comma-separated lambdas or start:stop:step with stop included; "
                                   "lambda 0 is always added (default: %(default)s)")
    sweep_parser.add_argument("--utility-budget", default=None, metavar="METRIC=AMOUNT,...",
                              help="choose the largest lambda whose utility loss against lambda 0 stays within "
                                   "these limits, e.g. mc2=2,fluency=10%%: N%% is relative to lambda 0, and a "
                                   "plain number is in percentage points for fractions (rates, MC1, MC2) and in "
                                   "the metric's own unit otherwise")
    sweep_parser.add_argument("--harm-metric", default=None, help="metric on the plot's y axis (default: detected)")
    sweep_parser.add_argument("--utility-metric", default=None,
                              help="metric on the plot's x axis (default: detected)")
    sweep_parser.add_argument("--model", default=None,
                              help="base model name or path (default: the model in the run's manifest)")
    sweep_parser.add_argument("--data-dir", default=None,
                              help="folder with pku-saferlhf/ and truthfulqa/ (default: the run's, else "
                                   "$SKUPY_DATA_DIR)")
    sweep_parser.add_argument("--out", required=True,
                              help="output folder for sweep.csv, sweep.md, sweep.json and tradeoff.png")
    _add_evaluation_options(sweep_parser)
    add_runtime_options(sweep_parser)
    sweep_parser.set_defaults(handler=run_sweep)


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=32,
                        help="held-out prompts per evaluation set (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens generated per response (default: skupy.evaluate's EvalSettings)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric groups of skupy.evaluate to compute, e.g. harmful,fluency,"
                             "truthfulqa,nll (default: all)")
    parser.add_argument("--judge", default="refusal",
                        help="safety judge for the harmful rate: refusal, learned, a saved learned judge (.npz) "
                             "or a Hugging Face classifier folder (default: %(default)s)")


def eval_settings_from_args(args, config):
    """Build the evaluation settings from --num-prompts, --max-new-tokens and --metrics."""
    changes = {}
    if args.max_new_tokens is not None:
        changes["max_new_tokens"] = args.max_new_tokens
    if args.metrics is not None:
        changes["metrics"] = tuple(name.strip() for name in args.metrics.split(",") if name.strip())
    return default_eval_settings(args.num_prompts, config, **changes)


def run_compare(args) -> int:
    from .cli import sku_config_from_args
    from .data import load_sku_data
    from .judges import make_judge

    names = parse_method_names(args.methods)
    config = sku_config_from_args(args)
    settings = eval_settings_from_args(args, config)
    if args.no_progress:
        logging.getLogger("skupy").setLevel(logging.INFO)
    data = load_sku_data(config.data_dir, seed=config.seed)
    judge = make_judge(args.judge, data)
    table = compare(names, config, data, judge, settings, args.out, progress=not args.no_progress,
                    save_models=args.save_models, recompute=args.recompute)
    print(table.to_markdown(), end="")
    out = Path(args.out)
    print(f"wrote {out / 'compare.csv'}, {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
    return 0


def run_sweep(args) -> int:
    from .checkpoint import load_checkpoint
    from .compare import read_run_config
    from .data import load_sku_data
    from .judges import make_judge

    lambdas = parse_lambdas(args.lambdas)
    if args.utility_budget is not None:
        parse_budget(args.utility_budget)  # report a bad budget before loading anything
    config = read_run_config(args.run)
    settings = eval_settings_from_args(args, config)
    data = load_sku_data(args.data_dir or config.data_dir, seed=config.seed)
    judge = make_judge(args.judge, data)
    model = load_checkpoint(args.model) if args.model else None
    result = sweep_lambda(args.run, lambdas, data, judge, settings, args.out,
                          model=model, utility_budget=args.utility_budget, harm_metric=args.harm_metric,
                          utility_metric=args.utility_metric)
    print(result.table.to_markdown(), end="")
    if result.chosen_lambda is not None:
        print(f"chosen lambda: {result.chosen_lambda:g} (largest within {result.budget})")
    print("wrote " + ", ".join(str(path) for path in result.files.values()))
    return 0
