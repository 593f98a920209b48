"""Run small training steps of skupy's C core under valgrind memcheck and check the report.

    python tools/valgrind_step.py            run valgrind on this script's workload and check its report
    python tools/valgrind_step.py --workload run the workload only (what valgrind runs)

The workload builds three tiny models (LLaMA with grouped-query attention and
LoRA, GPT-2 with a tied head, OPT post-norm with projections and
recomputation) and for each runs forward, cross-entropy and KL backward,
gradient clipping, an AdamW step, greedy and sampled generation and a LoRA
merge, then a second, larger batch (so the engine reallocates its buffers), and
frees the engine. Every op binding of skupy._core is also called once.

The check fails when memcheck reports an invalid read or write, a use of
uninitialised memory or an invalid free with a frame in skupy's extension, or
a leak (definitely or indirectly lost) allocated from it. Reports whose stacks
lie entirely in CPython, NumPy, OpenBLAS or libgomp are counted and printed but
do not fail the check; run with --show-all to list them.

Environment set for the valgrind run: PYTHONMALLOC=malloc, so that every
Python allocation is one valgrind can track, and one OpenMP and OpenBLAS
thread, because valgrind serializes threads anyway.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Frames from skupy's extension carry its file name or one of its C sources.
SKUPY_FRAME = re.compile(r"_core\.cpython|csrc/|\((?:ops|model|engine|generate|check|module|ops_module)\.c:\d+\)")
ERROR_KINDS = ("Invalid read", "Invalid write", "Invalid free", "Mismatched free", "uninitialised",
               "Source and destination overlap", "Syscall param")


def workload() -> None:
    import numpy as np

    from skupy import _core
    from skupy.config import ModelConfig
    from skupy.model import Model, init_params
    from skupy.optim import AdamW, clip_grad_norm

    _core.set_num_threads(1)
    configs = [
        ModelConfig(arch="llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=24, max_position_embeddings=32, lora_rank=2,
                    lora_targets=("q_proj", "v_proj", "down_proj")),
        ModelConfig(arch="gpt2", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_position_embeddings=32, norm="layernorm", activation="gelu_tanh", position="learned",
                    tie_word_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True),
        ModelConfig(arch="opt", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_position_embeddings=32, norm="layernorm", activation="relu", position="learned",
                    position_offset=2, attention_bias=True, attention_out_bias=True, mlp_bias=True, pre_norm=False,
                    final_norm=False, word_embed_proj_dim=8),
    ]
    rng = np.random.default_rng(0)
    for index, config in enumerate(configs):
        model = Model(config, init_params(config, seed=index, std=0.2), recompute=index == 2)
        optimizer = AdamW({name: model.params[name] for name in model.trainable}, lr=1e-3)
        for B, T in ((2, 6), (3, 11)):
            tokens = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
            mask = np.ones((B, T), np.int32)
            mask[0, :2] = 0
            targets = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
            weights = rng.random((B, T)).astype(np.float32)
            model.zero_grad()
            reference = model.forward(tokens, mask)
            model.accumulate_ce(tokens, targets, weights, mask)
            model.accumulate_kl(tokens, reference * 0.5, weights, mask, scale=0.3, reverse=bool(B % 2))
            model.hidden_states(tokens, mask)
            clip_grad_norm(model.grads, 1.0)
            optimizer.step(model.grads)
            model.generate_ids([[1, 2, 3], [4]], max_new_tokens=4)
            model.generate_ids([[5, 6]], max_new_tokens=4, temperature=0.8, top_k=5, top_p=0.9, seed=B,
                               stop_ids=[7])
        if config.lora_rank:
            model.merged_params()
        del model, optimizer
    call_every_op(np, _core)


def call_every_op(np, _core) -> None:
    """Call each op binding once with valid arguments, and once with a mismatched shape."""
    rng = np.random.default_rng(1)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    N, C, V, B, T, NH, NKV, HS = 5, 6, 7, 2, 4, 4, 2, 6
    tokens = rng.integers(0, V, N).astype(np.int32)
    weights = np.abs(f32(N))
    _core.embedding_forward(tokens, f32(V, C))
    _core.embedding_backward(f32(N, C), tokens, V)
    _core.linear_forward(f32(N, C), f32(3, C), f32(3))
    _core.linear_backward(f32(N, 3), f32(N, C), f32(3, C))
    _out, mean, rstd = _core.layernorm_forward(f32(N, C), f32(C), f32(C), 1e-5)
    _core.layernorm_backward(f32(N, C), f32(N, C), f32(C), mean, rstd)
    _out, rstd = _core.rmsnorm_forward(f32(N, C), f32(C), 1e-6)
    _core.rmsnorm_backward(f32(N, C), f32(N, C), f32(C), rstd)
    _core.rope_forward(f32(N, NH, HS), f32(N, HS // 2), f32(N, HS // 2), True)
    _core.rope_backward(f32(N, NH, HS), f32(N, HS // 2), f32(N, HS // 2))
    q, k, v = f32(B, T, NH, HS), f32(B, T, NKV, HS), f32(B, T, NKV, HS)
    _out, att = _core.attention_forward(q, k, v, np.ones((B, T), np.int32))
    _core.attention_forward(f32(B, 1, NH, HS), k, v, None, T - 1)
    _core.attention_backward(f32(B, T, NH, HS), att, q, k, v)
    for name in ("gelu_tanh", "gelu_exact", "relu", "silu"):
        getattr(_core, f"{name}_forward")(f32(N, C))
        getattr(_core, f"{name}_backward")(f32(N, C), f32(N, C))
    _core.swiglu_forward(f32(N, C), f32(N, C))
    _core.swiglu_backward(f32(N, C), f32(N, C), f32(N, C))
    logits = f32(N, V)
    _core.crossentropy_forward(logits, tokens, weights)
    _core.crossentropy_backward(logits, tokens, weights, 0.5, out=logits)
    _core.kl_forward(f32(N, V), f32(N, V), weights, True)
    _core.kl_backward(f32(N, V), f32(N, V), weights, 0.5)
    _core.adamw_update(f32(N, C), f32(N, C), np.zeros((N, C), np.float32), np.zeros((N, C), np.float32),
                       1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
    _core.sum_squares(f32(N, C))
    x = f32(N, C)
    _core.scale_inplace(x, 0.5)
    _core.axpby(x, x, f32(N, C), 1.0, -1.0)
    _core.lora_merge(f32(3, C), f32(2, C), f32(3, 2), 0.5)
    try:
        _core.linear_forward(f32(N, C), f32(3, C + 1))
    except ValueError:
        pass


def blocks(log_text: str) -> list:
    """Split a valgrind log into report blocks (lines between blank '==PID==' lines)."""
    result, current = [], []
    for line in log_text.splitlines():
        body = re.sub(r"^==\d+== ?", "", line)
        if not body.strip():
            if current:
                result.append(current)
            current = []
        else:
            current.append(body)
    if current:
        result.append(current)
    return result


def check_report(log_text: str, show_all: bool) -> int:
    """Print the summary lines and the reports that involve skupy; return the number of those."""
    findings, outside = [], []
    for block in blocks(log_text):
        head = block[0]
        is_error = any(kind in head for kind in ERROR_KINDS)
        is_leak = re.search(r"are (definitely|indirectly) lost", head) is not None
        if not (is_error or is_leak):
            continue
        if any(SKUPY_FRAME.search(line) for line in block):
            findings.append(block)
        else:
            outside.append(block)

    for line in log_text.splitlines():
        if re.search(r"ERROR SUMMARY|definitely lost:|indirectly lost:|possibly lost:|still reachable:", line):
            print(line)
    print(f"reports with a frame in skupy's extension: {len(findings)}")
    print(f"reports entirely outside skupy (CPython, NumPy, OpenBLAS, libgomp): {len(outside)}")
    for block in findings + (outside if show_all else []):
        print("\n".join(block[:25]))
        print()
    return len(findings)


def run_under_valgrind(show_all: bool, keep_log: bool) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("error: valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="skupy-valgrind-"))
    log_path = log_dir / "memcheck.log"
    env = dict(os.environ, PYTHONMALLOC="malloc", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [valgrind, "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite,indirect",
               "--errors-for-leak-kinds=definite", "--track-origins=yes", "--num-callers=30",
               f"--log-file={log_path}", sys.executable, str(Path(__file__).resolve()), "--workload"]
    print("$ " + " ".join(command))
    completed = subprocess.run(command, env=env)
    log_text = log_path.read_text(errors="replace")
    count = check_report(log_text, show_all)
    if keep_log:
        print(f"full log: {log_path}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    if completed.returncode != 0:
        print(f"error: the workload exited with status {completed.returncode} under valgrind", file=sys.stderr)
        return 1
    return 1 if count else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="store_true", help="run the workload only, without valgrind")
    parser.add_argument("--show-all", action="store_true", help="also print reports outside skupy")
    parser.add_argument("--keep-log", action="store_true", help="keep valgrind's log file and print its path")
    args = parser.parse_args()
    if args.workload:
        workload()
        return 0
    return run_under_valgrind(args.show_all, args.keep_log)


if __name__ == "__main__":
    sys.exit(main())
