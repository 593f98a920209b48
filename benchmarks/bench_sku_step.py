"""Benchmark one SKU stage-1 step: skupy against PyTorch eager on the same model and batches.

Each side runs in its own subprocess, so peak RSS is its own. Both use the
same real PKU-SafeRLHF / TruthfulQA batches (batch 2, K random answers) built
by skupy's batching code, the same SmolLM2-135M-Instruct weights, and the
same three losses (GD, RD, PD = -KL). The PyTorch side is the transformers
LlamaForCausalLM in eager mode with LoRA written as two extra matmuls on
q_proj and v_proj.

Usage:
    python benchmarks/bench_sku_step.py --mode lora --steps 3
    python benchmarks/bench_sku_step.py --mode full --steps 3
    python benchmarks/bench_sku_step.py --mode full --steps 3 --recompute

Prints per side: seconds per step (median), peak RSS, model FLOP utilization
against the sgemm peak measured in the same run; then the skupy/PyTorch ratios.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------
# shared: batches and FLOP counts


def build_batches(args, tokenizer, data, steps):
    """The GD, RD and PD batches of each step, as NumPy arrays."""
    import numpy as np

    from skupy.batching import make_kl_batch, make_lm_batch, make_random_disassociation_batch, pad_id_for
    from skupy.sku import encode_fitting, step_rng
    from skupy.sku_config import SKUConfig

    config = SKUConfig.from_preset("smollm2-135m", max_length=args.max_length, num_random_answers=args.k,
                                   batch_size=args.batch_size, template="sku")
    harmful_pairs, harmful = encode_fitting(tokenizer, data.harmful_train[:200], config)
    _, normal = encode_fitting(tokenizer, data.normal_train[:200], config)
    pad = pad_id_for(tokenizer)
    pool = data.harmful_answer_pool
    batches = []
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        idx = rng.choice(len(harmful), args.batch_size, replace=False)
        gd = make_lm_batch([harmful[i] for i in idx], pad)
        rd, _ = make_random_disassociation_batch(tokenizer, [harmful_pairs[i].question for i in idx], pool,
                                                 args.k, step_rng(0, step), "sku", args.max_length)
        nidx = rng.choice(len(normal), args.batch_size, replace=False)
        pd = make_kl_batch([normal[i] for i in nidx], pad)
        batches.append((gd, rd, pd))
    return batches


def step_flops(config, batches, lora):
    """Useful FLOPs of one step: 2 per parameter per token forward; backward 4 (full) or 2 (LoRA, input
    gradients only); the frozen reference forward of PD; attention score and value products."""
    C, L, V, F = config.hidden_size, config.num_layers, config.vocab_size, config.intermediate_size
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    block = C * q_width * 2 + C * kv_width * 2 + 3 * C * F
    matmul_params = L * block + V * C
    gd, rd, pd = batches
    total = 0.0
    for batch, passes in ((gd, 1), (rd, 1), (pd, 1)):
        tokens = float(batch["mask"].sum())
        T = batch["tokens"].shape[1]
        attention = 4.0 * tokens * T * q_width * L / 2  # causal: half the score matrix
        forward = 2.0 * matmul_params * tokens + attention
        backward = (1.0 if lora else 2.0) * forward
        total += passes * (forward + backward)
    total += 2.0 * matmul_params * float(pd["mask"].sum())  # reference forward for PD
    return total


def sgemm_peak_gflops(threads):
    """Measured float32 GEMM throughput of skupy's OpenBLAS (2048^3, best of 5)."""
    import numpy as np

    from skupy import _core

    _core.set_num_threads(threads)
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2048, 2048)).astype(np.float32)
    _core.linear_forward(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        _core.linear_forward(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best / 1e9


# ----------------------------------------------------------------------
# the skupy side


def run_skupy(args):
    import skupy
    from skupy.batching import split_by_length
    from skupy.checkpoint import load_checkpoint
    from skupy.data import load_sku_data
    from skupy.model import Model

    skupy.set_num_threads(args.threads)
    config, params, tokenizer = load_checkpoint("smollm2-135m-instruct")
    data = load_sku_data(args.data_dir)
    batches = build_batches(args, tokenizer, data, args.steps + 1)
    if args.mode == "lora":
        model = Model(config.replace(lora_rank=32, lora_alpha=16.0, lora_targets=("q_proj", "v_proj")), params,
                      trainable="lora", recompute=args.recompute)
        original = None
    else:
        original = params
        model = Model(config, {name: array.copy() for name, array in params.items()}, trainable="all",
                      recompute=args.recompute)
    optimizer = skupy.AdamW({name: model.params[name] for name in model.trainable}, lr=1e-5)

    # The same work as SKU.step: each batch split into length-sorted chunks (split_by_length),
    # and cross-entropy logits only on rows with a loss weight (inside accumulate_ce).
    times = []
    for gd, rd, pd in batches:
        start = time.perf_counter()
        model.zero_grad()
        for batch in (gd, rd):
            for c in split_by_length(batch):
                model.accumulate_ce(c["tokens"], c["targets"], c["weights"], c["mask"], c["positions"], scale=2.5)
        for c in split_by_length(pd):
            if original is None:
                reference = model.forward(c["tokens"], c["mask"], c["positions"], use_lora=False)
            else:
                reference = model.forward(c["tokens"], c["mask"], c["positions"], params=original)
            model.accumulate_kl(c["tokens"], reference, c["weights"], c["mask"], c["positions"], scale=-1.0)
        optimizer.step(model.grads)
        times.append(time.perf_counter() - start)
    return config, batches, times[1:]


# ----------------------------------------------------------------------
# the PyTorch side


def run_torch(args):
    import numpy as np
    import torch
    import transformers

    from skupy.checkpoint import load_checkpoint
    from skupy.data import load_sku_data
    from skupy.hf_io import save_hf

    torch.set_num_threads(args.threads)
    config, params, tokenizer = load_checkpoint("smollm2-135m-instruct")
    data = load_sku_data(args.data_dir)
    batches = build_batches(args, tokenizer, data, args.steps + 1)
    folder = Path(args.workdir) / "smollm2-hf"
    if not (folder / "config.json").exists():
        save_hf(folder, config, params, tokenizer)
    del params
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    model.train()

    if args.mode == "lora":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        adapters = []
        for layer in model.model.layers:
            for name in ("q_proj", "v_proj"):
                add_torch_lora(getattr(layer.self_attn, name), adapters, rank=32, alpha=16.0)
        trainable = adapters
        reference_model = None
    else:
        trainable = list(model.parameters())
        reference_model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                                            attn_implementation="eager").eval()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def tensors(batch):
        return (torch.from_numpy(batch["tokens"].astype(np.int64)), torch.from_numpy(batch["mask"]),
                torch.from_numpy(batch["targets"].astype(np.int64)), torch.from_numpy(batch["weights"]))

    def weighted_nll(batch):
        tokens, mask, targets, weights = tensors(batch)
        logits = model(tokens, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (nll * weights.flatten()).sum()

    times = []
    for gd, rd, pd in batches:
        start = time.perf_counter()
        optimizer.zero_grad()
        (2.5 * weighted_nll(gd)).backward()
        (2.5 * weighted_nll(rd)).backward()
        tokens, mask, _, weights = tensors(pd)
        with torch.no_grad():
            if reference_model is None:
                set_torch_lora(model, False)
                reference = model(tokens, attention_mask=mask).logits
                set_torch_lora(model, True)
            else:
                reference = reference_model(tokens, attention_mask=mask).logits
        logits = model(tokens, attention_mask=mask).logits
        log_p = torch.log_softmax(logits, -1)
        log_ref = torch.log_softmax(reference, -1)
        kl = (log_ref.exp() * (log_ref - log_p)).sum(-1)
        (-(kl * weights).sum()).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return config, batches, times[1:]


def add_torch_lora(linear, adapters, rank, alpha):
    import torch

    a = torch.nn.Parameter(torch.randn(rank, linear.in_features) / rank ** 0.5)
    b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
    adapters += [a, b]
    linear.lora = (a, b, alpha / rank)
    linear.lora_on = True
    original_forward = linear.forward

    def forward(x):
        out = original_forward(x)
        if linear.lora_on:
            out = out + (x @ a.t()) @ b.t() * (alpha / rank)
        return out

    linear.forward = forward


def set_torch_lora(model, enabled):
    for layer in model.model.layers:
        layer.self_attn.q_proj.lora_on = enabled
        layer.self_attn.v_proj.lora_on = enabled


# ----------------------------------------------------------------------


def child(args):
    runner = run_skupy if args.side == "skupy" else run_torch
    config, batches, times = runner(args)
    flops = statistics.mean(step_flops(config, b, args.mode == "lora") for b in batches[1:])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"side": args.side, "seconds": statistics.median(times), "all_seconds": times,
                      "peak_rss_mib": peak_kib / 1024, "flops": flops}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recompute", action="store_true",
                        help="skupy keeps only block inputs and recomputes the rest in backward (less memory)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--k", type=int, default=5, help="random answers per question (RD)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data-dir", default=os.environ.get("SKUPY_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--workdir", default="/tmp/skupy-bench")
    parser.add_argument("--side", choices=("skupy", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.side:
        child(args)
        return

    results = {}
    for side in ("skupy", "torch"):
        command = [sys.executable, __file__, "--side", side] + [a for a in sys.argv[1:]]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"the {side} side failed with exit status {finished.returncode}:\n{finished.stderr}")
        results[side] = json.loads(finished.stdout.strip().splitlines()[-1])
    peak = sgemm_peak_gflops(args.threads)
    print(f"SKU step, SmolLM2-135M-Instruct, {args.mode}{', skupy recompute' if args.recompute else ''}, "
          f"batch {args.batch_size}, K={args.k}, max_length {args.max_length}, {args.threads} threads; "
          f"sgemm peak {peak:.1f} GFLOP/s")
    for side, result in results.items():
        gflops = result["flops"] / result["seconds"] / 1e9
        print(f"  {side:6s} {result['seconds']:.3f} s/step  peak RSS {result['peak_rss_mib']:.0f} MiB  "
              f"{gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of sgemm peak")
    time_ratio = results["skupy"]["seconds"] / results["torch"]["seconds"]
    rss_ratio = results["skupy"]["peak_rss_mib"] / results["torch"]["peak_rss_mib"]
    print(f"  ratio skupy/torch: time {time_ratio:.2f}, peak RSS {rss_ratio:.2f}")


if __name__ == "__main__":
    main()
