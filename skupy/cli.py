"""The `skupy` command line: generate text, run SKU unlearning, evaluate and compare."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

# Modules with a register_commands(subparsers, add_runtime_options) function; each
# subcommand it adds sets handler=callable(args) -> exit code with set_defaults.
EXTRA_COMMAND_MODULES = (".eval_cli", ".compare_cli")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="number of CPU threads for the C core (default: all cores)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")


def build_parser() -> argparse.ArgumentParser:
    from .sku_config import describe_presets

    parser = argparse.ArgumentParser(prog="skupy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate an answer to a prompt")
    generate.add_argument("prompt", nargs="+", help="one or more prompts; each is answered separately")
    generate.add_argument("--model", default="smollm2-135m-instruct",
                          help="model name, .gguf file or Hugging Face folder (default: %(default)s)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="maximum tokens to generate per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 is off")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass; 1 is off")
    generate.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    generate.add_argument("--no-chat", action="store_true",
                          help="feed the prompt as raw text instead of a chat-template user message")
    _add_runtime_options(generate)
    generate.set_defaults(handler=run_generate)

    unlearn = commands.add_parser(
        "unlearn", help="run SKU: harmful knowledge acquisition, then knowledge negation",
        epilog="presets:\n" + describe_presets(), formatter_class=argparse.RawDescriptionHelpFormatter)
    unlearn.add_argument("--preset", default=None, help="start from a named preset (listed below)")
    unlearn.add_argument("--config", default=None, help="YAML or JSON file with SKUConfig fields")
    unlearn.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config field, e.g. --set lr=1e-4 --set K=3 (repeatable)")
    unlearn.add_argument("--model", default=None, help="model name or path (overrides the config)")
    unlearn.add_argument("--data-dir", default=None,
                         help="folder with pku-saferlhf/ and truthfulqa/ (default: $SKUPY_DATA_DIR)")
    unlearn.add_argument("--out", required=True, help="output folder for the task vector, model and logs")
    unlearn.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    unlearn.add_argument("--recompute", action="store_true",
                         help="recompute activations in backward to save memory (about 30%% slower)")
    unlearn.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    _add_runtime_options(unlearn)
    unlearn.set_defaults(handler=run_unlearn)

    # Commands that live in other modules register themselves here.
    for module_name in EXTRA_COMMAND_MODULES:
        module = importlib.import_module(module_name, __package__)
        module.register_commands(commands, _add_runtime_options)
    return parser


def _configure(args) -> None:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        from . import set_num_threads

        set_num_threads(args.threads)


def run_generate(args) -> int:
    from . import load

    model = load(args.model)
    answers = model.generate(args.prompt, args.max_new_tokens, chat=not args.no_chat,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, answer in zip(args.prompt, answers):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0


def sku_config_from_args(args):
    """Build the SKUConfig: preset, then config file, then --set overrides, then explicit options."""
    from .sku_config import SKUConfig

    if args.config:
        config = SKUConfig.from_file(args.config)
        if args.preset:
            config = SKUConfig.from_dict({"preset": args.preset, **_file_values(args.config)})
    elif args.preset:
        config = SKUConfig.from_preset(args.preset)
    else:
        config = SKUConfig()
    config = config.apply_overrides(args.overrides)
    changes = []
    if args.model:
        changes.append(f"model={args.model}")
    if args.data_dir:
        changes.append(f"data_dir={args.data_dir}")
    return config.apply_overrides(changes)


def _file_values(path) -> dict:
    from .sku_config import SKUConfig

    return SKUConfig.from_file(path).to_dict()


def run_unlearn(args) -> int:
    from .sku import SKU

    config = sku_config_from_args(args)
    if args.no_progress:
        logging.getLogger("skupy").setLevel(logging.INFO)
    sku = SKU(config, progress=not args.no_progress, recompute=args.recompute)
    result = sku.run(args.out, resume=args.resume)
    out = Path(args.out)
    print(f"wrote {out / 'unlearned'} (unlearned model, Hugging Face format)")
    print(f"wrote {out / 'task_vector.safetensors'} (task vector, norm {result.task_vector.norm():.4f})")
    if result.evaluation:
        original, unlearned = result.evaluation["original"], result.evaluation["unlearned"]
        print("held-out answer NLL (original -> unlearned): "
              f"harmful {original['harmful_nll']:.3f} -> {unlearned['harmful_nll']:.3f}, "
              f"normal {original['normal_nll']:.3f} -> {unlearned['normal_nll']:.3f}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure(args)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as error:
        print(f"skupy {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
