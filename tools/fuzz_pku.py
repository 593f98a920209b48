"""Fuzz skupy.data.load_pku_saferlhf with damaged and hostile PKU-SafeRLHF files.

Each input writes one file, as .jsonl (most often), .json or .jsonl.gz. Its
content is either the fuzzer's bytes or records built from fuzzer-chosen field
values: wrong types, empty or huge text, labels that are not booleans, deep
nesting, invalid UTF-8. load_pku_saferlhf may return or raise a ValueError
(DataError and the standard library's decoding errors are ValueErrors); any
other exception or a hang (libFuzzer -timeout) is reported. A returned result
must keep only responses labelled unsafe as harmful pairs.

    python tools/fuzz_pku.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import gzip
import json
import logging
import sys

import fuzz_common
from fuzz_common import UnexpectedBehavior, mutate_bytes, pick_float, pick_int

import atheris

with atheris.instrument_imports(include=["skupy"]):
    from skupy.data import load_pku_saferlhf

# Records with empty text make the loader log a warning per file, thousands of times a second.
logging.getLogger("skupy.data").setLevel(logging.ERROR)

SCRATCH = fuzz_common.scratch_dir("skupy-fuzz-pku-")
SUFFIXES = (".jsonl", ".jsonl", ".jsonl", ".json", ".jsonl.gz")
FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")
VALID_RECORD = {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench.",
                "response_1": "I can't help with that.", "is_response_0_safe": False, "is_response_1_safe": True}


def fuzzed_field_value(provider: atheris.FuzzedDataProvider):
    kind = provider.ConsumeIntInRange(0, 9)
    if kind == 0:
        return provider.ConsumeUnicode(20)
    if kind == 1:
        return provider.ConsumeBool()
    if kind == 2:
        return pick_int(provider, -1, 2)
    if kind == 3:
        return pick_float(provider)
    if kind == 4:
        return None
    if kind == 5:
        return [provider.ConsumeUnicode(4)]
    if kind == 6:
        return {"text": provider.ConsumeUnicode(4)}
    if kind == 7:
        return " \t\n"
    if kind == 8:
        return "x" * provider.ConsumeIntInRange(0, 200000)
    return provider.ConsumeUnicodeNoSurrogates(20)


def fuzzed_records_text(provider: atheris.FuzzedDataProvider, as_json_list: bool) -> bytes:
    """Return records built from VALID_RECORD with fuzzer-chosen fields changed or removed."""
    records = []
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        record = dict(VALID_RECORD)
        for _ in range(provider.ConsumeIntInRange(0, 3)):
            field = provider.PickValueInList(list(FIELDS) + ["extra"])
            if provider.ConsumeProbability() < 0.2:
                record.pop(field, None)
            else:
                record[field] = fuzzed_field_value(provider)
        records.append(record)
    if as_json_list:
        wrapped = {"data": records} if provider.ConsumeBool() else records
        return json.dumps(wrapped).encode("utf-8", "surrogatepass")
    lines = [json.dumps(record) for record in records]
    if provider.ConsumeProbability() < 0.1:
        lines.insert(provider.ConsumeIntInRange(0, len(lines)), "[" * provider.ConsumeIntInRange(1, 100000))
    if provider.ConsumeProbability() < 0.1:
        lines.insert(provider.ConsumeIntInRange(0, len(lines)), provider.PickValueInList(
            ["[1, 2]", "null", "\"text\"", "{\"prompt\": 1e999}", "{\"a\": " + "1" * 5000 + "}", "{", ""]))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def check_result(result) -> None:
    """Raise UnexpectedBehavior unless every harmful pair comes from a response labelled unsafe."""
    unsafe = {(item.prompt, item.response) for item in result.labelled_responses if not item.is_safe}
    for pair in result.harmful_pairs:
        if (pair.question, pair.answer) not in unsafe:
            raise UnexpectedBehavior(f"harmful pair {pair!r} has no response labelled unsafe")
    if not result.harmful_pairs or result.num_records < 1:
        raise UnexpectedBehavior("load_pku_saferlhf returned no harmful pairs instead of raising DataError")


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    suffix = provider.PickValueInList(list(SUFFIXES))
    if provider.ConsumeProbability() < 0.4:
        content = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 4096))
    else:
        content = fuzzed_records_text(provider, as_json_list=suffix == ".json")
        if provider.ConsumeProbability() < 0.3:
            content = mutate_bytes(provider, content)
    if suffix.endswith(".gz") and provider.ConsumeProbability() < 0.8:
        content = gzip.compress(content)
        if provider.ConsumeProbability() < 0.3:
            content = mutate_bytes(provider, content)
    path = SCRATCH / f"records{suffix}"
    path.write_bytes(content)

    try:
        result = load_pku_saferlhf(path, deduplicate=provider.ConsumeBool())
    except ValueError:
        return
    finally:
        path.unlink()
    check_result(result)


if __name__ == "__main__":
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
