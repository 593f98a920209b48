"""Generation and forward throughput: skupy against transformers on SmolLM2-135M-Instruct.

Both sides run in this process, one after the other, on the same weights
(transformers loads the HF folder skupy writes from the packaged GGUF), the
same prompts and the same thread count. Greedy decoding, a fixed number of
new tokens (no early stop), batch 1 and a larger batch.

Usage:
    python benchmarks/bench_generate.py [--batch 8] [--new-tokens 32] [--threads 2]
"""
import argparse
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.", "How do vaccines work?", "Give three tips for learning a language.",
    "What causes the seasons on Earth?", "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.", "What is machine learning?",
    "How do I boil an egg?", "Name the planets of the solar system.", "What is the speed of light?",
    "Translate 'good morning' into Spanish.", "What does a compiler do?", "How do bees make honey?",
]


def timed(function, repeats=2):
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/skupy-bench")
    args = parser.parse_args()

    import torch
    import transformers

    import skupy
    from skupy.hf_io import save_hf

    skupy.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    ours = skupy.load("smollm2-135m-instruct")
    folder = Path(args.workdir) / "smollm2-hf"
    if not (folder / "config.json").exists():
        save_hf(folder, ours.config, ours.params, ours.tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = ours.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]
    pad = tokenizer.pad_token_id

    def left_padded(batch):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask

    print(f"SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens, {args.threads} threads")
    for batch_size in (1, args.batch):
        batch = (prompts * ((batch_size // len(prompts)) + 1))[:batch_size]
        ids, mask = left_padded(batch)

        def run_skupy():
            ours.generate_ids(batch, args.new_tokens)

        def run_torch():
            with torch.no_grad():
                theirs.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)

        ours_seconds, theirs_seconds = timed(run_skupy), timed(run_torch)
        new_tokens = batch_size * args.new_tokens
        print(f"  generate batch {batch_size:2d}: skupy {new_tokens / ours_seconds:7.1f} tok/s, "
              f"transformers {new_tokens / theirs_seconds:7.1f} tok/s, ratio {theirs_seconds / ours_seconds:.2f}x")

    # forward-only scoring throughput on full sequences
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, ours.config.vocab_size, (8, 128)).astype(np.int32)
    ours_seconds = timed(lambda: ours.forward(tokens))
    with torch.no_grad():
        theirs_seconds = timed(lambda: theirs(torch.from_numpy(tokens.astype(np.int64))).logits)
    print(f"  forward 8x128: skupy {tokens.size / ours_seconds:7.1f} tok/s, "
          f"transformers {tokens.size / theirs_seconds:7.1f} tok/s, ratio {theirs_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    main()
