#!/usr/bin/env bash
# Build skupy's C extension with AddressSanitizer and UndefinedBehaviorSanitizer
# into a copy of the tree, then run tests or a command against that build.
#
#   tools/sanitize.sh                  build, then run the default test subset
#   tools/sanitize.sh tests/test_x.py  build, then run pytest with these arguments
#   tools/sanitize.sh --build-only     build and print the tree's path
#   tools/sanitize.sh --run CMD ARGS   build, then run CMD in the tree with the sanitizer environment
#
# The copy keeps the in-place build of the checkout (skupy/_core*.so) untouched.
# Environment:
#   SKUPY_SANITIZE_TREE  where the copy goes (default: $TMPDIR/skupy-sanitize, reused between runs)
#   PYTHON               the interpreter with skupy's dependencies (default: python3)
#
# Sanitizer settings:
#   LD_PRELOAD=libasan   Python itself is not built with ASan, so the runtime must load first.
#   PYTHONMALLOC=malloc  every Python allocation goes through malloc, which ASan checks.
#   ASAN_OPTIONS=detect_leaks=0         CPython leaks objects at exit by design.
#   UBSAN_OPTIONS=halt_on_error=1       any undefined behavior fails the run.
#   CFLAGS=-fno-wrapv    Python's own build flags include -fwrapv, which makes signed
#                        overflow defined and hides it from UBSan; the later flag wins.
# The default subset is sized to finish in a few minutes on 2 cores: the oracle
# tests that load torch and the tests that need the real data are left out.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="${SKUPY_SANITIZE_TREE:-${TMPDIR:-/tmp}/skupy-sanitize}"
python="${PYTHON:-python3}"

default_tests=(
    tests/test_ops_bad_input.py tests/test_ops_gradcheck.py tests/test_fuzz_regressions.py
    tests/test_threads.py tests/test_fuzz_smoke.py tests/test_checkpoint_bad_input.py tests/test_gguf_io.py
    tests/test_hf_io.py tests/test_task_vector.py tests/test_batching.py
    -m "not oracle and not slow"
)

mode="tests"
case "${1:-}" in
    --build-only) mode="build"; shift ;;
    --run) mode="run"; shift ;;
esac

copy_tree() {
    mkdir -p "$tree"
    if git -C "$repo" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        # Tracked files and untracked ones that git does not ignore: the working tree as it is now.
        git -C "$repo" ls-files -z --cached --others --exclude-standard \
            | (cd "$repo" && tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$tree"
    else
        (cd "$repo" && tar --exclude=.git --exclude='*.so' --exclude=build -cf - .) | tar -xf - -C "$tree"
    fi
}

build() {
    echo "== copying the tree to $tree" >&2
    copy_tree
    echo "== building skupy._core with ASan and UBSan" >&2
    (cd "$tree" && SKUPY_SANITIZE=1 CFLAGS="-fno-wrapv" \
        "$python" setup.py build_ext --inplace --build-temp "$tree/build/sanitize" > "$tree/build-sanitize.log" 2>&1) \
        || { tail -40 "$tree/build-sanitize.log" >&2; exit 1; }
}

libasan="$(gcc -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
    echo "error: gcc -print-file-name=libasan.so found no AddressSanitizer runtime; install gcc's libasan" >&2
    exit 1
fi

build
export LD_PRELOAD="$libasan"
export PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
export SKUPY_SANITIZED_BUILD=1
cd "$tree"

case "$mode" in
    build) echo "$tree" ;;
    run) exec "$@" ;;
    tests)
        if [ "$#" -eq 0 ]; then
            set -- "${default_tests[@]}"
        fi
        exec "$python" -m pytest -q -p no:cacheprovider "$@"
        ;;
esac
