"""Fuzz skupy.data.load_truthfulqa with damaged and hostile TruthfulQA CSV files.

Each input writes one CSV whose content is either the fuzzer's bytes or a table
built from fuzzer-chosen headers and cells (quotes, separators, line breaks,
NUL bytes, a byte-order mark, cells over the csv module's 131072-character
field limit, invalid UTF-8). load_truthfulqa may return or raise a ValueError
(DataError is one); any other exception or a hang (libFuzzer -timeout) is
reported. Returned questions must have a non-empty question and best answer.

    python tools/fuzz_truthfulqa.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import csv
import io
import sys

import fuzz_common
from fuzz_common import UnexpectedBehavior, mutate_bytes

import atheris

with atheris.instrument_imports(include=["skupy"]):
    from skupy.data import load_truthfulqa

SCRATCH = fuzz_common.scratch_dir("skupy-fuzz-truthfulqa-")
PATH = SCRATCH / "TruthfulQA.csv"
COLUMNS = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")
VALID_ROW = ("Adversarial", "Misconceptions", "What happens if you eat watermelon seeds?",
             "The seeds pass through you", "Nothing happens; You eat seeds;", "You grow watermelons", "web")
SPECIAL_CELLS = ("", " ", ";", ";;", "\"", "\"\"", "a\nb", "a\r\nb", "\x00", "\ufeff", "a,b", "\u2028")


def fuzzed_cell(provider: atheris.FuzzedDataProvider) -> str:
    kind = provider.ConsumeIntInRange(0, 4)
    if kind == 0:
        return provider.PickValueInList(list(SPECIAL_CELLS))
    if kind == 1:
        return "x" * provider.ConsumeIntInRange(0, 200000)
    return provider.ConsumeUnicode(24)


def fuzzed_table(provider: atheris.FuzzedDataProvider) -> bytes:
    """Return CSV text built from the TruthfulQA columns with fuzzer-chosen changes."""
    header = list(COLUMNS)
    for _ in range(provider.ConsumeIntInRange(0, 2)):
        index = provider.ConsumeIntInRange(0, len(header) - 1)
        header[index] = provider.PickValueInList(list(COLUMNS) + ["", "question", " Question"])
    rows = []
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        row = list(VALID_ROW)
        for _ in range(provider.ConsumeIntInRange(0, 3)):
            row[provider.ConsumeIntInRange(0, len(row) - 1)] = fuzzed_cell(provider)
        if provider.ConsumeProbability() < 0.1:
            row = row[:provider.ConsumeIntInRange(0, len(row))]
        if provider.ConsumeProbability() < 0.1:
            row.append(fuzzed_cell(provider))
        rows.append(row)
    stream = io.StringIO()
    writer = csv.writer(stream, quoting=provider.PickValueInList([csv.QUOTE_MINIMAL, csv.QUOTE_ALL,
                                                                   csv.QUOTE_NONNUMERIC]))
    writer.writerow(header)
    writer.writerows(rows)
    text = stream.getvalue()
    if provider.ConsumeProbability() < 0.1:
        text = "\ufeff" + text
    return text.encode("utf-8", "surrogatepass")


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    if provider.ConsumeProbability() < 0.4:
        content = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 4096))
    else:
        content = fuzzed_table(provider)
        if provider.ConsumeProbability() < 0.3:
            content = mutate_bytes(provider, content)
    PATH.write_bytes(content)

    try:
        questions = load_truthfulqa(PATH)
    except ValueError:
        return
    if not questions:
        raise UnexpectedBehavior("load_truthfulqa returned no questions instead of raising DataError")
    for item in questions:
        if not item.question or not item.best_answer:
            raise UnexpectedBehavior(f"question {item.index} has an empty question or best answer")


if __name__ == "__main__":
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
