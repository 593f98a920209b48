"""One SKU LoRA step on a Llama-2-7B-shaped model with random weights, on this machine.

The published SKU code trains Llama-2-7B on four 80 GB GPUs. This benchmark
checks that skupy runs the same step (LoRA r=32, alpha=16 on q_proj and
v_proj; batch 2, K=5 random answers, T=256 tokens per sequence) inside 24 GiB:
frozen block weights are stored in bfloat16 and activations are recomputed
per block in backward.

Usage:
    python benchmarks/bench_7b_lora_step.py            # Llama-2-7B shape, T=256
    python benchmarks/bench_7b_lora_step.py --layers 4 # a quick check of the same code path

Prints the peak RSS and the time of each phase. Inputs are random token ids:
only shapes matter for time and memory.
"""
import argparse
import resource
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="transformer blocks (Llama-2-7B: 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (T)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--k", type=int, default=5, help="random answers per question (RD rows = batch * K)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import skupy
    from skupy.config import ModelConfig
    from skupy.model import Model, init_params

    skupy.set_num_threads(args.threads)
    config = ModelConfig(arch="llama", vocab_size=32000, hidden_size=4096, num_layers=args.layers, num_heads=32,
                         num_kv_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                         norm_eps=1e-5, lora_rank=32, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"))

    start = time.perf_counter()
    params = init_params(config, seed=0, frozen_bfloat16=True)
    model = Model(config, params, trainable="lora", recompute=True)
    del params
    init_seconds = time.perf_counter() - start
    print(f"model: {model.num_parameters() / 1e9:.2f}B parameters, "
          f"{model.num_parameters(trainable_only=True) / 1e6:.1f}M trainable (LoRA); built in {init_seconds:.0f} s; "
          f"peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)

    rng = np.random.default_rng(0)
    T, b, k = args.seq_len, args.batch_size, args.k

    def lm_batch(rows):
        tokens = rng.integers(3, config.vocab_size, (rows, T)).astype(np.int32)
        targets = np.roll(tokens, -1, axis=1)
        weights = np.zeros((rows, T), np.float32)
        weights[:, T // 4:T - 1] = 1.0 / (rows * (T - 1 - T // 4))  # answer tokens after a question prefix
        return tokens, targets, weights

    phases = {}
    model.zero_grad()
    step_start = time.perf_counter()

    tokens, targets, weights = lm_batch(b)
    start = time.perf_counter()
    model.accumulate_ce(tokens, targets, weights, scale=2.5)
    phases["GD forward+backward"] = time.perf_counter() - start
    print(f"  GD done, peak RSS {peak_rss_gib():.2f} GiB", flush=True)

    tokens, targets, weights = lm_batch(b * k)
    start = time.perf_counter()
    model.accumulate_ce(tokens, targets, weights, scale=2.5)
    phases["RD forward+backward"] = time.perf_counter() - start
    print(f"  RD done, peak RSS {peak_rss_gib():.2f} GiB", flush=True)

    tokens, _, _ = lm_batch(b)
    weights = np.full((b, T), 1.0 / (b * T), np.float32)
    start = time.perf_counter()
    reference = model.forward(tokens, use_lora=False)
    model.accumulate_kl(tokens, reference, weights, scale=-1.0)
    phases["PD reference + forward+backward"] = time.perf_counter() - start

    optimizer = skupy.AdamW({name: model.params[name] for name in model.trainable}, lr=2e-4)
    start = time.perf_counter()
    optimizer.step(model.grads)
    phases["AdamW"] = time.perf_counter() - start
    total = time.perf_counter() - step_start

    print(f"SKU LoRA step, Llama-2-7B shape with {args.layers} layers, batch {b}, K={k}, T={T}, "
          f"{args.threads} threads")
    for name, seconds in phases.items():
        print(f"  {name:32s} {seconds:8.1f} s")
    print(f"  {'step total':32s} {total:8.1f} s")
    print(f"  peak RSS {peak_rss_gib():.2f} GiB (limit 24 GiB)")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


if __name__ == "__main__":
    main()
