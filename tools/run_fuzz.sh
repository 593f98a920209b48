#!/usr/bin/env bash
# Run skupy's atheris fuzz harnesses (tools/fuzz_*.py), one after the other.
#
#   tools/run_fuzz.sh                    every target, 100000 executions each
#   tools/run_fuzz.sh -n 5000 gguf ops   the named targets, 5000 executions each
#   tools/run_fuzz.sh --sanitize ops     run under the ASan/UBSan build of tools/sanitize.sh
#
# Under --sanitize, libFuzzer gets no coverage (gcc's libasan defines the
# coverage callbacks atheris relies on), so the harnesses run with
# --no-libfuzzer: they replay the corpus and run random mutations of it (see
# fuzz_common.run_without_libfuzzer). Run the release build first, so that the
# corpus is rich.
#
# Targets: gguf hf pku truthfulqa sku_config ops engine.
# Each target keeps its corpus in $SKUPY_FUZZ_DIR/<target>/corpus (default
# build/fuzz, which git ignores) and starts from the minimized inputs in
# tests/fuzz_corpus/<target> as well. A crash, an exception type the harness
# does not allow, a timeout (20 s per input) or too much memory stops the target
# and leaves the input in $SKUPY_FUZZ_DIR/<target>/artifacts; the script then
# goes on with the next target and exits 1 at the end. To replay one input:
#   python tools/fuzz_<target>.py build/fuzz/<target>/artifacts/crash-...
#
# Environment: PYTHON (default python3; needs atheris: pip install atheris),
# SKUPY_FUZZ_DIR, SKUPY_FUZZ_NICE (niceness, default 10).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="${SKUPY_FUZZ_DIR:-$repo/build/fuzz}"
niceness="${SKUPY_FUZZ_NICE:-10}"
runs=100000
sanitize=0
all_targets=(gguf hf pku truthfulqa sku_config ops engine)

declare -A max_len=([gguf]=4096 [hf]=1024 [pku]=2048 [truthfulqa]=2048 [sku_config]=2048 [ops]=512 [engine]=512)

usage() {
    sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "$1"
}

targets=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -n|--runs) runs="$2"; shift 2 ;;
        -s|--sanitize) sanitize=1; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "error: unknown option $1" >&2; usage 2 ;;
        *)
            if [ -z "${max_len[$1]:-}" ]; then
                echo "error: unknown target $1; targets: ${all_targets[*]}" >&2
                exit 2
            fi
            targets+=("$1"); shift ;;
    esac
done
[ "${#targets[@]}" -gt 0 ] || targets=("${all_targets[@]}")

if ! "$python" -c "import atheris" 2> /dev/null; then
    echo "error: $python cannot import atheris; install it with: $python -m pip install atheris" >&2
    exit 2
fi

rss_limit=4096
launcher=()
no_libfuzzer=()
tools_dir="$repo/tools"
if [ "$sanitize" -eq 1 ]; then
    tree="$(PYTHON="$python" "$repo/tools/sanitize.sh" --build-only)" || exit 1
    tools_dir="$tree/tools"
    launcher=("$repo/tools/sanitize.sh" --run)
    no_libfuzzer=(--no-libfuzzer)
    # ASan keeps freed memory in quarantine, so the process needs more room.
    rss_limit=8192
fi

failed=()
for target in "${targets[@]}"; do
    dir="$work/$target"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    corpora=("$dir/corpus")
    if [ -d "$repo/tests/fuzz_corpus/$target" ]; then
        corpora+=("$repo/tests/fuzz_corpus/$target")
    fi
    echo "== $target: $runs executions, log in $dir/log.txt"
    start=$(date +%s)
    SKUPY_FUZZ_DIR="$work" nice -n "$niceness" "${launcher[@]}" "$python" "$tools_dir/fuzz_$target.py" "${no_libfuzzer[@]}" \
        -runs="$runs" -timeout=20 -rss_limit_mb="$rss_limit" -max_len="${max_len[$target]}" -len_control=0 \
        -print_final_stats=1 -artifact_prefix="$dir/artifacts/" "${corpora[@]}" > "$dir/log.txt" 2>&1
    status=$?
    seconds=$(( $(date +%s) - start ))
    executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log.txt" | tail -1)
    echo "   exit status $status, ${executed:-?} executions in ${seconds} s"
    if [ "$status" -ne 0 ]; then
        grep -m1 -E "Uncaught Python exception|ERROR: AddressSanitizer|runtime error|libFuzzer: (timeout|out-of-memory|deadly signal)" \
            -A3 "$dir/log.txt" | sed 's/^/   /'
        ls -t "$dir/artifacts" | head -3 | sed "s|^|   artifact: $dir/artifacts/|"
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "== findings in: ${failed[*]}"
    exit 1
fi
echo "== no findings"
