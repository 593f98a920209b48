"""Task-vector negation throughput against this machine's memory copy bandwidth.

Negation writes theta_original - lambda * tau: it reads two float32 arrays and
writes one, 12 bytes per parameter. Two copy baselines of the same buffers read
one array and write one, 8 bytes per element: numpy.copyto (one thread) and a
copy through skupy's own threaded kernel (axpby with b = 0). All rates are GB/s
of memory traffic, measured in the same run.

Usage:
    python benchmarks/bench_negation.py [--threads 2]
"""
import argparse
import time

import numpy as np

SIZES = {"SmolLM2-135M": 134_515_008, "1B": 1_000_000_000}


def best_of(function, repeats=3):
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tensor-size", type=int, default=4_718_592,
                        help="elements per parameter tensor (default: one 1536x3072 matrix)")
    args = parser.parse_args()

    import skupy
    from skupy import _core
    from skupy.task_vector import TaskVector

    skupy.set_num_threads(args.threads)
    for label, total in SIZES.items():
        count = max(1, total // args.tensor_size)
        shape = (args.tensor_size,)
        original = {f"p{i}": np.full(shape, 1.0, np.float32) for i in range(count)}
        tau = TaskVector({f"p{i}": np.full(shape, 0.5, np.float32) for i in range(count)})
        out = {name: np.empty(shape, np.float32) for name in original}

        def negate_only():
            # in place into preallocated arrays, so page faults of fresh memory are not timed
            tau.apply_to(out, -1.0, inplace=True)

        def numpy_copy():
            for name, base in original.items():
                np.copyto(out[name], base)

        def threaded_copy():
            for name, base in original.items():
                _core.axpby(out[name], base, base, 1.0, 0.0)

        elements = count * args.tensor_size
        numpy_rate = 8 * elements / best_of(numpy_copy) / 1e9
        threaded_rate = 8 * elements / best_of(threaded_copy) / 1e9
        negate_rate = 12 * elements / best_of(negate_only) / 1e9
        print(f"{label:13s} ({elements / 1e6:.0f}M float32): numpy copy {numpy_rate:5.1f} GB/s, threaded copy "
              f"{threaded_rate:5.1f} GB/s, negation {negate_rate:5.1f} GB/s = "
              f"{100 * negate_rate / max(numpy_rate, threaded_rate):.0f}% of the faster copy")
        del original, tau, out


if __name__ == "__main__":
    main()
