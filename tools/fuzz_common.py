"""Shared pieces of skupy's atheris fuzz harnesses (tools/fuzz_*.py).

Each harness imports the code under test inside atheris.instrument_imports(),
defines test_one_input(data) and calls run_harness() from its
__main__ block. Arguments after the script name go to libFuzzer, so a harness
runs like any libFuzzer target:

    python tools/fuzz_gguf.py -runs=100000 -timeout=20 CORPUS_DIR

tools/run_fuzz.sh wraps this for every harness. A harness raises (and so makes
libFuzzer stop and write a crash-* file) when the code under test raises an
exception type that its contract does not allow, returns an inconsistent
result, or changes an input it must not change. Hangs are caught by
libFuzzer's -timeout, and large allocations by the address-space limit that
limit_memory() sets.
"""
from __future__ import annotations

import atexit
import faulthandler
import hashlib
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The harness tests the skupy of the tree it sits in (a sanitizer build copies
# the whole tree), ahead of any installed copy.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import atheris  # noqa: E402
import numpy as np  # noqa: E402

# Address-space limit for loader harnesses, in MiB. A file that makes a loader
# allocate more than this raises MemoryError, which the harness reports.
MEMORY_LIMIT_ENV = "SKUPY_FUZZ_MEMORY_MB"
DEFAULT_MEMORY_LIMIT_MB = 4096

# Integers that sit on the edges that parsers and size computations get wrong.
INTERESTING_INTS = (
    0, 1, 2, 3, 7, 8, 16, 31, 32, 255, 256, 4095, 65535, 65536,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
    -1, -2, -(2**31), -(2**63), 10**30,
)
INTERESTING_FLOATS = (
    0.0, -0.0, 1.0, -1.0, 0.5, 1e-5, 1e-38, 1e-45, 3.4e38, 3.5e38, 1e300,
    float("nan"), float("inf"), float("-inf"),
)


def limit_memory() -> None:
    """Cap the address space of this process unless AddressSanitizer is loaded.

    ASan reserves terabytes of virtual memory for its shadow, so under ASan
    the limit is left to libFuzzer's -rss_limit_mb instead.
    """
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        return
    megabytes = int(os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT_MB))
    limit = megabytes * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def scratch_dir(prefix: str) -> Path:
    """Return a temporary folder for this process, in /dev/shm when it exists, removed at exit."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


class UnexpectedBehavior(AssertionError):
    """The code under test returned or changed something its contract rules out."""


def pick_int(provider: "atheris.FuzzedDataProvider", low: int = 0, high: int = 8) -> int:
    """Return a small int in [low, high] most of the time and an interesting edge value otherwise."""
    if provider.ConsumeProbability() < 0.85:
        return provider.ConsumeIntInRange(low, high)
    return provider.PickValueInList(list(INTERESTING_INTS))


def pick_float(provider: "atheris.FuzzedDataProvider") -> float:
    """Return an ordinary float most of the time and an edge value (NaN, inf, huge) otherwise."""
    if provider.ConsumeProbability() < 0.7:
        return provider.ConsumeFloatInRange(-4.0, 4.0)
    return provider.PickValueInList(list(INTERESTING_FLOATS))


def mutate_bytes(provider: "atheris.FuzzedDataProvider", data: bytes, max_edits: int = 6,
                 focus: int = 0) -> bytes:
    """Apply a few fuzzer-chosen edits to data: overwrite, insert, delete, truncate, or plant an integer.

    focus > 0 makes most edits land in the first focus bytes (a header).
    Planted integers are little-endian u32 or u64 edge values, which is how
    size and offset fields in GGUF and safetensors headers are stored.
    """
    buffer = bytearray(data)
    for _ in range(provider.ConsumeIntInRange(0, max_edits)):
        if not buffer:
            buffer += provider.ConsumeBytes(provider.ConsumeIntInRange(1, 16))
            continue
        span = len(buffer)
        if focus and provider.ConsumeProbability() < 0.8:
            span = min(span, focus)
        offset = provider.ConsumeIntInRange(0, span - 1)
        kind = provider.ConsumeIntInRange(0, 5)
        if kind == 0:
            chunk = provider.ConsumeBytes(provider.ConsumeIntInRange(1, 8))
            buffer[offset:offset + len(chunk)] = chunk
        elif kind == 1:
            buffer[offset:offset] = provider.ConsumeBytes(provider.ConsumeIntInRange(1, 32))
        elif kind == 2:
            del buffer[offset:offset + provider.ConsumeIntInRange(1, 64)]
        elif kind == 3:
            del buffer[offset:]
        else:
            width = 4 if kind == 4 else 8
            value = provider.PickValueInList(list(INTERESTING_INTS)) % (1 << (8 * width))
            buffer[offset:offset + width] = value.to_bytes(width, "little")
    return bytes(buffer)


@atheris.instrument_func
def break_array(provider: "atheris.FuzzedDataProvider", value: np.ndarray, others: list):
    """Return value changed in one fuzzer-chosen way that a C entry point must reject or handle.

    The array may get another dtype or byte order, another shape or an empty
    dimension. It may become non-contiguous, Fortran-ordered, unaligned or
    read-only, or get a bad element (NaN, infinity, an id out of range). Or it
    is replaced by another argument, a view into one, a list, a memoryview, a
    0-d array or something that is no array at all.
    """
    if value.ndim == 0:
        return value.reshape(1) if provider.ConsumeBool() else None
    kind = provider.ConsumeIntInRange(0, 16)
    if kind == 0:
        return value.astype(provider.PickValueInList([np.float64, np.float16, np.int32, np.int64, np.bool_,
                                                      np.complex64, np.uint16, np.float32, np.int32]))
    if kind == 1:
        return value.astype(value.dtype.newbyteorder(">"))
    if kind == 2:
        return value.reshape(-1) if value.ndim > 1 else value.reshape(1, -1)
    if kind == 3:
        shape = list(value.shape) or [1]
        shape[provider.ConsumeIntInRange(0, len(shape) - 1)] += provider.PickValueInList([-1, 1, 2])
        return np.zeros([max(size, 0) for size in shape], value.dtype)
    if kind == 4:
        shape = list(value.shape) or [1]
        shape[provider.ConsumeIntInRange(0, len(shape) - 1)] = 0
        return np.zeros(shape, value.dtype)
    if kind == 5:
        doubled = np.repeat(value, 2, axis=0) if value.ndim else value
        return doubled[::2] if value.ndim else doubled
    if kind == 6:
        return np.asfortranarray(value.T.copy()).T if value.ndim > 1 else value[::-1]
    if kind == 7:
        buffer = bytearray(value.nbytes + value.itemsize)
        unaligned = np.frombuffer(buffer, dtype=value.dtype, count=value.size, offset=1).reshape(value.shape)
        unaligned[...] = value
        return unaligned
    if kind == 8:
        value = value.copy()
        value.flags.writeable = False
        return value
    if kind == 9 and value.size and value.dtype == np.float32:
        value = value.copy()
        value.reshape(-1)[provider.ConsumeIntInRange(0, value.size - 1)] = pick_float(provider)
        return value
    if kind == 10 and value.size and value.dtype == np.int32:
        value = value.copy()
        value.reshape(-1)[provider.ConsumeIntInRange(0, value.size - 1)] = provider.PickValueInList(
            [-1, -(2**31), 2**31 - 1, 1 << 20, 7, 64])
        return value
    if kind == 11 and others:
        return provider.PickValueInList(others)
    if kind == 12 and others:
        other = provider.PickValueInList(others)
        if isinstance(other, np.ndarray) and other.size >= value.size and other.dtype == value.dtype:
            return other.reshape(-1)[other.size - value.size:].reshape(value.shape)
        return other
    if kind == 13:
        return provider.PickValueInList([None, 0, 1.5, "x", [1.0, 2.0], (), b"\x00" * 8, object()])
    if kind == 14:
        return value.tolist()
    if kind == 15:
        return np.asarray(value.reshape(-1)[0]) if value.size else np.zeros((), value.dtype)  # a 0-d array
    return memoryview(value.copy()) if value.flags.c_contiguous else value


@atheris.instrument_func
def break_scalar(provider: "atheris.FuzzedDataProvider", is_int: bool):
    """Return a replacement for a scalar argument: an edge value, a NumPy scalar or a wrong type."""
    kind = provider.ConsumeIntInRange(0, 5)
    if kind == 0:
        return provider.PickValueInList(list(INTERESTING_INTS) + [10**400])
    if kind == 1:
        return pick_float(provider)
    if kind == 2:
        return provider.PickValueInList([None, "1", b"1", [1], np.float32(1), np.int64(2), np.array([1, 2]), True])
    if kind == 3:
        return np.float64(pick_float(provider))
    if kind == 4 and is_int:
        return np.int64(provider.PickValueInList(list(INTERESTING_INTS[:-1])) % 2**63)
    return object()


def run_harness(test_one_input) -> None:
    """Fuzz test_one_input with the command-line arguments of this process, then exit.

    Harnesses import the code under test inside atheris.instrument_imports()
    first, so that libFuzzer receives its coverage. With --no-libfuzzer among the
    arguments, run_without_libfuzzer() is used instead.
    """
    limit_memory()
    if NO_LIBFUZZER_FLAG in sys.argv:
        sys.exit(run_without_libfuzzer(test_one_input, [arg for arg in sys.argv[1:] if arg != NO_LIBFUZZER_FLAG]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


NO_LIBFUZZER_FLAG = "--no-libfuzzer"


def run_without_libfuzzer(test_one_input, arguments: list) -> int:
    """Replay every corpus file, then run mutations of them and random inputs; return the exit status.

    Used under tools/sanitize.sh: gcc's libasan defines the coverage callbacks
    that atheris's libFuzzer relies on, so libFuzzer receives no coverage there and
    would mutate only an empty input. This loop mutates the corpus a release
    run built instead. It takes libFuzzer's -runs=, -seed=, -timeout=,
    -max_len= and -artifact_prefix= options and corpus folders, and prints the
    same final stat:: lines. A failing input is saved as <prefix>crash-<sha1>;
    <prefix>last-input always holds the input being run, for crashes that kill
    the process (an AddressSanitizer report).
    """
    options = {"runs": 10000, "seed": 0, "timeout": 20, "max_len": 4096, "artifact_prefix": "./"}
    folders = []
    for argument in arguments:
        if argument.startswith("-") and "=" in argument:
            key, value = argument.lstrip("-").split("=", 1)
            if key in options:
                options[key] = value if key == "artifact_prefix" else int(value)
        elif not argument.startswith("-"):
            folders.append(Path(argument))
    rng = random.Random(options["seed"])
    seeds = [path.read_bytes() for folder in folders if folder.is_dir() for path in sorted(folder.iterdir())
             if path.is_file()]
    prefix = options["artifact_prefix"]
    last_input = Path(f"{prefix}last-input")

    def run_one(data: bytes) -> bool:
        last_input.write_bytes(data)
        # A watchdog thread dumps every thread's stack and exits, even when the hang is in C code.
        faulthandler.dump_traceback_later(options["timeout"], exit=True)
        try:
            test_one_input(data)
        except BaseException:  # noqa: BLE001 - the point is to report any exception with its input
            crash = Path(f"{prefix}crash-{hashlib.sha1(data).hexdigest()}")
            crash.write_bytes(data)
            traceback.print_exc()
            print(f"Test unit written to {crash}", file=sys.stderr)
            return False
        finally:
            faulthandler.cancel_dump_traceback_later()
        return True

    start = time.monotonic()
    executed = 0
    for data in seeds:
        executed += 1
        if not run_one(data):
            return 1
    while executed < options["runs"]:
        if seeds and rng.random() < 0.8:
            data = mutate_randomly(rng, rng.choice(seeds), seeds, options["max_len"])
        else:
            data = rng.randbytes(rng.randint(0, options["max_len"]))
        executed += 1
        if not run_one(data):
            return 1
    seconds = max(time.monotonic() - start, 1e-9)
    print(f"Done {executed} runs in {int(seconds)} second(s)")
    print(f"stat::number_of_executed_units: {executed}")
    print(f"stat::average_exec_per_sec:     {int(executed / seconds)}")
    return 0


def mutate_randomly(rng: random.Random, data: bytes, seeds: list, max_len: int) -> bytes:
    """Return data with one to four random byte edits, or spliced with another seed."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        offset = rng.randrange(len(buffer) + 1)
        if kind == 0 and buffer:
            buffer[min(offset, len(buffer) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and buffer:
            buffer[min(offset, len(buffer) - 1)] = rng.randrange(256)
        elif kind == 2:
            buffer[offset:offset] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3:
            del buffer[offset:offset + rng.randint(1, 8)]
        else:
            other = rng.choice(seeds)
            buffer = buffer[:offset] + other[rng.randrange(len(other) + 1):]
    return bytes(buffer[:max_len])
