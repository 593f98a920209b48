"""Short runs of every fuzz harness in tools/, so that a harness that no longer runs is noticed.

Each test starts one harness in a subprocess for a few hundred executions,
replaying the minimized inputs in tests/fuzz_corpus/<target> first (inputs that
once crashed skupy, and a small corpus that covers the harness). The long runs
are tools/run_fuzz.sh's job. Skipped when atheris is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_ROOT = REPO_ROOT / "tests" / "fuzz_corpus"

# Executions per harness: small enough for about a minute in all on 2 cores.
# The config harness runs PyYAML, which is slow, so it gets fewer.
RUNS = {"gguf": 300, "hf": 300, "pku": 500, "truthfulqa": 500, "sku_config": 200, "ops": 500, "engine": 300}
MAX_LEN = {"gguf": 4096, "hf": 1024, "pku": 2048, "truthfulqa": 2048, "sku_config": 2048, "ops": 512, "engine": 512}
TIMEOUT_SECONDS = 600


@pytest.mark.parametrize("target", sorted(RUNS))
def test_harness_runs_clean(tmp_path, target):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [sys.executable, str(REPO_ROOT / "tools" / f"fuzz_{target}.py"), f"-runs={RUNS[target]}", "-seed=1",
               "-timeout=60", f"-max_len={MAX_LEN[target]}", "-len_control=0", f"-artifact_prefix={tmp_path}/",
               str(corpus)]
    if (CORPUS_ROOT / target).is_dir():
        command.append(str(CORPUS_ROOT / target))

    completed = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, cwd=tmp_path,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "Done" in output, output[-4000:]
    assert not list(tmp_path.glob("crash-*")), output[-4000:]
    assert not list(tmp_path.glob("timeout-*")), output[-4000:]
