"""Forward+backward of a weighted cross-entropy loss on a small random model: skupy against PyTorch.

Both sides run in this process on identical weights (a transformers model
saved as an HF folder and loaded by skupy), the same batch and thread count.

Usage:
    python benchmarks/bench_tiny_fwd_bwd.py [--arch llama|gpt2|opt] [--threads 2]
"""
import argparse
import tempfile
import time

import numpy as np


def build(arch):
    import transformers

    common = dict(vocab_size=4096, max_position_embeddings=256)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, **common))
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=256, n_layer=4, n_head=8, n_positions=256, vocab_size=4096, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8, word_embed_proj_dim=256,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **common))


def best_of(function, repeats=5):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("llama", "gpt2", "opt"), default="llama")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    import torch

    import skupy
    from skupy.hf_io import load_hf

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    skupy.set_num_threads(args.threads)
    hf_model = build(args.arch).float().train()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder, safe_serialization=True)
        config, params = load_hf(folder)
    ours = skupy.Model(config, params)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq_len)
    tokens = rng.integers(0, 4096, shape).astype(np.int32)
    targets = rng.integers(0, 4096, shape).astype(np.int32)
    weights = np.full(shape, 1.0 / tokens.size, np.float32)
    t_tokens, t_targets, t_weights = (torch.from_numpy(tokens.astype(np.int64)),
                                      torch.from_numpy(targets.astype(np.int64)), torch.from_numpy(weights))

    def run_skupy():
        ours.zero_grad()
        ours.accumulate_ce(tokens, targets, weights)

    def run_torch():
        hf_model.zero_grad()
        logits = hf_model(t_tokens).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t_targets.flatten(), reduction="none")
        (nll * t_weights.flatten()).sum().backward()

    ours_seconds, theirs_seconds = best_of(run_skupy), best_of(run_torch)
    print(f"{args.arch}: {ours.num_parameters() / 1e6:.1f}M parameters, batch {shape}, {args.threads} threads: "
          f"skupy {ours_seconds * 1000:.1f} ms, torch {theirs_seconds * 1000:.1f} ms, "
          f"time ratio skupy/torch {ours_seconds / theirs_seconds:.2f}")


if __name__ == "__main__":
    main()
