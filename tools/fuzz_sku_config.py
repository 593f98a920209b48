"""Fuzz skupy.sku_config.SKUConfig.from_file with damaged and hostile YAML and JSON config files.

Each input writes one .yaml, .yml or .json file whose content is either the
fuzzer's bytes or a mapping of SKUConfig keys (and a few unknown ones) to
fuzzer-chosen values, dumped as YAML or JSON. YAML inputs may also carry
anchors and aliases that expand exponentially, Python tags that safe_load
rejects, or deep nesting. from_file may return or raise ValueError; any other
exception or a hang (libFuzzer -timeout) is reported. A returned config must
pass its own validate().

    python tools/fuzz_sku_config.py -runs=100000 -timeout=20
"""
from __future__ import annotations

import json
import sys

import fuzz_common
from fuzz_common import mutate_bytes, pick_float, pick_int

import atheris

with atheris.instrument_imports(include=["skupy"]):
    import yaml

    from skupy.sku_config import PRESETS, SKUConfig, field_names

SCRATCH = fuzz_common.scratch_dir("skupy-fuzz-sku-config-")
SUFFIXES = (".yaml", ".yml", ".json")
KEYS = tuple(field_names()) + ("K", "preset", "unknown_key", "")
TEXT_VALUES = ("true", "no", "none", "null", "", "1e-4", "2e-4", "inf", "nan", "-1", "0x10", "1_000", "q_proj,v_proj",
               "q_proj,", "sku", "chat", "~") + tuple(PRESETS)


def fuzzed_value(provider: atheris.FuzzedDataProvider, depth: int = 0):
    kind = provider.ConsumeIntInRange(0, 8)
    if kind == 0:
        return pick_int(provider, -2, 2048)
    if kind == 1:
        return pick_float(provider)
    if kind == 2:
        return provider.PickValueInList(list(TEXT_VALUES))
    if kind == 3:
        return provider.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5 and depth < 3:
        return [fuzzed_value(provider, depth + 1) for _ in range(provider.ConsumeIntInRange(0, 3))]
    if kind == 6 and depth < 3:
        return {provider.PickValueInList(list(KEYS)): fuzzed_value(provider, depth + 1)
                for _ in range(provider.ConsumeIntInRange(0, 2))}
    return provider.ConsumeUnicodeNoSurrogates(16)


def alias_bomb(levels: int) -> str:
    """Return a YAML flow list whose aliases expand to 10**levels strings."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def yaml_special(provider: atheris.FuzzedDataProvider) -> str:
    """Return a YAML value text that exercises a part of the YAML language safe_load treats specially."""
    kind = provider.ConsumeIntInRange(0, 5)
    if kind == 0:
        return alias_bomb(provider.ConsumeIntInRange(1, 9))
    if kind == 1:
        return "!!python/object/apply:os.getcwd []"
    if kind == 2 and provider.ConsumeProbability() < 0.2:
        # PyYAML takes about 2 s to reach its RecursionError, so deep nesting is rare.
        return "[" * provider.ConsumeIntInRange(1, 20000)
    if kind == 3:
        return "!!binary aGVsbG8="
    if kind == 4:
        return "{? [a, b] : c}"
    return "2001-12-14t21:59:43.10-05:00"


def fuzzed_mapping_text(provider: atheris.FuzzedDataProvider, as_json: bool) -> bytes:
    values = {}
    for _ in range(provider.ConsumeIntInRange(0, 5)):
        values[provider.PickValueInList(list(KEYS))] = fuzzed_value(provider)
    if as_json:
        text = json.dumps(values)
        if provider.ConsumeProbability() < 0.05:
            text = "[" * provider.ConsumeIntInRange(1, 100000)
        return text.encode("utf-8", "surrogatepass")
    text = yaml.safe_dump(values, allow_unicode=True)
    if provider.ConsumeProbability() < 0.2:
        text += f"{provider.PickValueInList(list(KEYS))}: {yaml_special(provider)}\n"
    return text.encode("utf-8", "surrogatepass")


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    suffix = provider.PickValueInList(list(SUFFIXES))
    if provider.ConsumeProbability() < 0.35:
        content = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 2048))
    else:
        content = fuzzed_mapping_text(provider, as_json=suffix == ".json")
        if provider.ConsumeProbability() < 0.2:
            content = mutate_bytes(provider, content)
    path = SCRATCH / f"config{suffix}"
    path.write_bytes(content)

    try:
        config = SKUConfig.from_file(path)
    except ValueError:
        return
    finally:
        path.unlink()
    config.validate()


if __name__ == "__main__":
    fuzz_common.run_harness(test_one_input)
    sys.exit(0)
