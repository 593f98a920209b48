"""Tests of skupy.data on the real data folder and on small files built in tmp_path.

The real data folder is $SKUPY_DATA_DIR, else ../shared/data next to the
repository; tests that need it are skipped when it is missing.
"""
import csv
import gzip
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from skupy import data
from skupy.data import DataError, QAPair

REPO_ROOT = Path(__file__).resolve().parents[1]
TRUTHFULQA_HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


@pytest.fixture(scope="module")
def data_dir():
    path = Path(os.environ.get("SKUPY_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not (path / "pku-saferlhf" / "train.jsonl").is_file():
        pytest.skip(f"real data folder not found at {path}; set SKUPY_DATA_DIR")
    return path


@pytest.fixture(scope="module")
def sku_data(data_dir):
    return data.load_sku_data(data_dir, seed=0)


def raw_records(path):
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def pku_record(prompt="How do I pick a lock?", safe0=True, safe1=False, response0="I can't help with that.",
               response1="Use a tension wrench and a pick."):
    return {"prompt": prompt, "response_0": response0, "response_1": response1,
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "safer_response_id": 0 if safe0 else 1}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_truthfulqa(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(TRUTHFULQA_HEADER)
        writer.writerows(rows)
    return path


def small_data_folder(root):
    write_jsonl(root / "pku-saferlhf" / "train.jsonl", [pku_record(), pku_record("Q2?", False, True)])
    write_jsonl(root / "pku-saferlhf" / "test.jsonl", [pku_record("Q3?")])
    rows = [["Adversarial", "Misconceptions", f"Question {i}?", f"Best {i}", f"Best {i}; Other {i};",
             f"Wrong {i}", "https://example.org"] for i in range(20)]
    write_truthfulqa(root / "truthfulqa" / "TruthfulQA.csv", rows)
    return root


# ---------------------------------------------------------------------------
# Real files


def test_pku_train_counts(data_dir):
    loaded = data.load_pku_saferlhf(data_dir / "pku-saferlhf" / "train.jsonl")
    assert loaded.num_records == 3986
    assert len({pair.question for pair in loaded.harmful_pairs}) == 744
    # Each record has exactly one safe response, so one harmful pair per record.
    assert len(loaded.harmful_pairs) == 3986
    assert len(loaded.labelled_responses) == 2 * 3986


def test_pku_test_counts(data_dir):
    loaded = data.load_pku_saferlhf(data_dir / "pku-saferlhf" / "test.jsonl")
    assert loaded.num_records == 1149
    assert len({pair.question for pair in loaded.harmful_pairs}) == 186
    assert len(loaded.harmful_pairs) == 1149


def test_pku_harmful_pairs_are_unsafe_responses(data_dir):
    path = data_dir / "pku-saferlhf" / "train.jsonl"
    records = raw_records(path)
    loaded = data.load_pku_saferlhf(path)
    for pair in loaded.harmful_pairs:
        record = records[pair.record]
        unsafe = [record[f"response_{i}"].strip() for i in (0, 1) if not record[f"is_response_{i}_safe"]]
        assert pair.question == record["prompt"].strip()
        assert pair.answer in unsafe
        assert pair.source == "pku-saferlhf"


def test_pku_labelled_responses_match_labels(data_dir):
    path = data_dir / "pku-saferlhf" / "test.jsonl"
    records = raw_records(path)
    loaded = data.load_pku_saferlhf(path)
    assert sum(item.is_safe for item in loaded.labelled_responses) == len(records)
    for item in loaded.labelled_responses:
        record = records[item.record]
        index = 0 if record["response_0"].strip() == item.response else 1
        assert item.is_safe == record[f"is_response_{index}_safe"]


def test_pku_train_test_prompts_disjoint(sku_data):
    train_prompts = {pair.question for pair in sku_data.harmful_train}
    test_prompts = {pair.question for pair in sku_data.harmful_test}
    assert train_prompts
    assert test_prompts
    assert train_prompts.isdisjoint(test_prompts)


def test_pku_deduplicate_keeps_distinct_pairs(data_dir):
    path = data_dir / "pku-saferlhf" / "train.jsonl"
    records = raw_records(path)
    expected = {(r["prompt"].strip(), r[f"response_{i}"].strip())
                for r in records for i in (0, 1) if not r[f"is_response_{i}_safe"]}
    loaded = data.load_pku_saferlhf(path, deduplicate=True)
    assert len(loaded.harmful_pairs) == len(expected)
    assert {(pair.question, pair.answer) for pair in loaded.harmful_pairs} == expected


def test_harmful_answer_pool_distinct(sku_data):
    pool = sku_data.harmful_answer_pool
    assert len(pool) == len(set(pool))
    assert set(pool) == {pair.answer for pair in sku_data.harmful_train}
    assert len(pool) < len(sku_data.harmful_train)


def test_truthfulqa_question_count(data_dir):
    questions = data.load_truthfulqa(data_dir / "truthfulqa" / "TruthfulQA.csv")
    assert len(questions) == 817
    assert [item.index for item in questions] == list(range(817))
    for item in questions:
        assert item.question
        assert item.best_answer
        assert item.correct_answers
        assert item.incorrect_answers
        assert all(answer and answer == answer.strip() for answer in item.correct_answers + item.incorrect_answers)


def test_truthfulqa_mc_lists_from_cells(data_dir):
    path = data_dir / "truthfulqa" / "TruthfulQA.csv"
    questions = data.load_truthfulqa(path)
    with open(path, encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream))
    for item, row in zip(questions, rows):
        assert item.question == row["Question"].strip()
        assert item.best_answer == row["Best Answer"].strip()
        assert "; ".join(item.correct_answers) == row["Correct Answers"].strip().rstrip(";").strip()
        assert "; ".join(item.incorrect_answers) == row["Incorrect Answers"].strip().rstrip(";").strip()
        assert item.category == row["Category"]


def test_truthfulqa_pairs_split_correct_cell(data_dir):
    questions = data.load_truthfulqa(data_dir / "truthfulqa" / "TruthfulQA.csv")
    pairs = data.truthfulqa_pairs(questions)
    expected = sum(len(set((item.best_answer,) + item.correct_answers)) for item in questions)
    assert len(pairs) == expected
    assert len(set((pair.question, pair.answer) for pair in pairs)) == len(pairs)
    by_question = {}
    for pair in pairs:
        by_question.setdefault(pair.record, []).append(pair.answer)
    for item in questions:
        answers = by_question[item.index]
        assert answers[0] == item.best_answer
        assert set(answers) == set((item.best_answer,) + item.correct_answers)
        assert all(";" not in answer for answer in item.correct_answers)


def test_sku_data_normal_split_sizes(sku_data):
    total = len(sku_data.normal_train) + len(sku_data.normal_val) + len(sku_data.normal_test)
    assert len(sku_data.normal_train) == total * 7 // 10
    assert len(sku_data.normal_val) == total // 10
    assert len(sku_data.truthfulqa) == 817
    assert len(sku_data.harmful_train) == 3986
    assert len(sku_data.harmful_test) == 1149


def test_sku_data_split_reproducible(data_dir, sku_data):
    again = data.load_sku_data(data_dir, seed=0)
    other = data.load_sku_data(data_dir, seed=1)
    assert again.normal_train == sku_data.normal_train
    assert again.normal_val == sku_data.normal_val
    assert again.normal_test == sku_data.normal_test
    assert other.normal_train != sku_data.normal_train


def test_sku_data_splits_disjoint(sku_data):
    splits = [{(p.question, p.answer) for p in part}
              for part in (sku_data.normal_train, sku_data.normal_val, sku_data.normal_test)]
    assert splits[0].isdisjoint(splits[1])
    assert splits[0].isdisjoint(splits[2])
    assert splits[1].isdisjoint(splits[2])
    everything = data.truthfulqa_pairs(sku_data.truthfulqa)
    assert splits[0] | splits[1] | splits[2] == {(p.question, p.answer) for p in everything}


def test_sku_data_split_by_question(data_dir):
    loaded = data.load_sku_data(data_dir, seed=3, split_by_question=True)
    questions = [{p.question for p in part} for part in (loaded.normal_train, loaded.normal_val, loaded.normal_test)]
    assert questions[0].isdisjoint(questions[1])
    assert questions[0].isdisjoint(questions[2])
    assert questions[1].isdisjoint(questions[2])
    assert len(questions[0]) == 817 * 7 // 10
    assert len(questions[1]) == 817 // 10


def test_sku_data_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SKUPY_DATA_DIR", str(data_dir))
    loaded = data.load_sku_data()
    assert loaded.data_dir == data_dir
    assert len(loaded.harmful_test) == 1149


# ---------------------------------------------------------------------------
# Splitting


def split_input(count):
    return [QAPair(f"q{i // 3}", f"a{i}") for i in range(count)]


@pytest.mark.parametrize("total, expected", [(10, (7, 1, 2)), (100, (70, 10, 20)), (2598, (1818, 259, 521)),
                                             (1, (0, 0, 1)), (0, (0, 0, 0))])
def test_split_counts_floor(total, expected):
    assert data.split_counts(total, (0.7, 0.1, 0.2)) == expected


def test_split_counts_invalid_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        data.split_counts(10, (0.7, 0.2, 0.2))
    with pytest.raises(ValueError, match="three finite"):
        data.split_counts(10, (0.5, 0.5))


def test_split_pairs_documented_procedure():
    import numpy as np

    pairs = split_input(50)
    order = np.random.default_rng(7).permutation(50)
    train, val, test = data.split_pairs(pairs, seed=7)
    assert train == [pairs[i] for i in order[:35]]
    assert val == [pairs[i] for i in order[35:40]]
    assert test == [pairs[i] for i in order[40:]]


def test_split_pairs_by_question_groups():
    pairs = split_input(60)
    train, val, test = data.split_pairs(pairs, seed=2, by_question=True)
    assert sorted(train + val + test, key=lambda p: p.answer) == sorted(pairs, key=lambda p: p.answer)
    assert len({p.question for p in train}) == 14
    assert len({p.question for p in val}) == 2
    assert {p.question for p in train}.isdisjoint({p.question for p in test})


# ---------------------------------------------------------------------------
# PKU-SafeRLHF files built in tmp_path


def test_pku_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(pku_record()) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        data.load_pku_saferlhf(path)


def test_pku_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object, found list"):
        data.load_pku_saferlhf(path)


def test_pku_missing_field(tmp_path):
    record = pku_record()
    del record["is_response_1_safe"]
    path = write_jsonl(tmp_path / "missing.jsonl", [pku_record(), record])
    with pytest.raises(DataError, match="line 2: missing field.*is_response_1_safe"):
        data.load_pku_saferlhf(path)


def test_pku_invalid_label(tmp_path):
    path = write_jsonl(tmp_path / "label.jsonl", [pku_record(safe1="no")])
    with pytest.raises(DataError, match="is_response_1_safe.*true or false"):
        data.load_pku_saferlhf(path)


def test_pku_integer_labels_accepted(tmp_path):
    path = write_jsonl(tmp_path / "ints.jsonl", [pku_record(safe0=1, safe1=0)])
    loaded = data.load_pku_saferlhf(path)
    assert [pair.answer for pair in loaded.harmful_pairs] == ["Use a tension wrench and a pick."]


def test_pku_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: contains no records"):
        data.load_pku_saferlhf(path)


def test_pku_all_safe(tmp_path):
    path = write_jsonl(tmp_path / "safe.jsonl", [pku_record(safe0=True, safe1=True)] * 3)
    with pytest.raises(DataError, match="none of the 3 records has a response labelled unsafe"):
        data.load_pku_saferlhf(path)


def test_pku_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        data.load_pku_saferlhf(tmp_path / "nothere.jsonl")


def test_pku_both_unsafe_gives_two_pairs(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [pku_record(safe0=False, safe1=False, response0="  first  ")])
    loaded = data.load_pku_saferlhf(path)
    assert [pair.answer for pair in loaded.harmful_pairs] == ["first", "Use a tension wrench and a pick."]
    assert all(pair.record == 0 for pair in loaded.harmful_pairs)


def test_pku_empty_response_skipped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "blank.jsonl", [pku_record(response1="   "), pku_record("Q2?")])
    with caplog.at_level(logging.WARNING, logger="skupy.data"):
        loaded = data.load_pku_saferlhf(path)
    assert len(loaded.harmful_pairs) == 1
    assert len(loaded.labelled_responses) == 3
    assert "skipped 1 responses" in caplog.text


def test_pku_json_list_and_data_key(tmp_path):
    records = [pku_record(), pku_record("Q2?", False, True)]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(records), encoding="utf-8")
    as_object = tmp_path / "object.json"
    as_object.write_text(json.dumps({"data": records}), encoding="utf-8")
    for path in (as_list, as_object):
        loaded = data.load_pku_saferlhf(path)
        assert [pair.question for pair in loaded.harmful_pairs] == ["How do I pick a lock?", "Q2?"]


def test_pku_json_bad_record_names_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([pku_record(), "text"]), encoding="utf-8")
    with pytest.raises(DataError, match="record 2: expected a JSON object"):
        data.load_pku_saferlhf(path)


def test_pku_jsonl_gz(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write(json.dumps(pku_record()) + "\n")
    assert len(data.load_pku_saferlhf(path).harmful_pairs) == 1


def test_pku_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    records = [pku_record(), pku_record("Q2?", False, True)]
    path = tmp_path / "train.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(records), path)
    loaded = data.load_pku_saferlhf(path)
    assert [(p.question, p.answer) for p in loaded.harmful_pairs] == [
        ("How do I pick a lock?", "Use a tension wrench and a pick."), ("Q2?", "I can't help with that.")]


def test_pku_parquet_without_reader(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    for module in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        data.load_pku_saferlhf(path)


def test_pku_unsupported_suffix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        data.load_pku_saferlhf(path)


# ---------------------------------------------------------------------------
# TruthfulQA files built in tmp_path


def test_split_answer_cell_trailing_separator():
    assert data.split_answer_cell("a; b;c ;  ; ") == ["a", "b", "c"]
    assert data.split_answer_cell("") == []


def test_truthfulqa_missing_column(tmp_path):
    path = tmp_path / "tqa.csv"
    path.write_text("Question,Best Answer\nQ?,A\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column.*Correct Answers.*Incorrect Answers"):
        data.load_truthfulqa(path)


def test_truthfulqa_header_only(tmp_path):
    path = write_truthfulqa(tmp_path / "tqa.csv", [])
    with pytest.raises(DataError, match="contains no questions"):
        data.load_truthfulqa(path)


def test_truthfulqa_empty_best_answer(tmp_path):
    path = write_truthfulqa(tmp_path / "tqa.csv", [["T", "C", "Q1?", "A1", "A1", "B1", "S"],
                                                   ["T", "C", "Q2?", " ", "A2", "B2", "S"]])
    with pytest.raises(DataError, match="line 3: Question and Best Answer must not be empty"):
        data.load_truthfulqa(path)


def test_truthfulqa_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="github.com/sylinrl/TruthfulQA"):
        data.load_truthfulqa(tmp_path / "TruthfulQA.csv")


def test_truthfulqa_pairs_skip_duplicate_best(tmp_path):
    path = write_truthfulqa(tmp_path / "tqa.csv", [["T", "C", "Q?", "Best", "Other; Best; Third;", "Wrong", "S"]])
    pairs = data.truthfulqa_pairs(data.load_truthfulqa(path))
    assert [pair.answer for pair in pairs] == ["Best", "Other", "Third"]
    assert all(pair.question == "Q?" for pair in pairs)


# ---------------------------------------------------------------------------
# Users' jsonl and the data folder


def test_jsonl_pairs_default_keys(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": " Q1 ", "response": "A1", "extra": 1},
                                                 {"prompt": "Q2", "response": "A2"}])
    pairs = data.load_jsonl_pairs(path)
    assert [(p.question, p.answer, p.record) for p in pairs] == [("Q1", "A1", 0), ("Q2", "A2", 1)]
    assert pairs[0].source == str(path)


def test_jsonl_pairs_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Q", "answer": "A"}])
    pairs = data.load_jsonl_pairs(path, question_key="question", answer_key="answer", source="mine")
    assert pairs == [QAPair("Q", "A", "mine", 0)]


def test_jsonl_pairs_missing_key_names_line(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Q", "response": "A"}, {"prompt": "Q2"}])
    with pytest.raises(DataError, match=r"mine\.jsonl, line 2: missing key\(s\) response"):
        data.load_jsonl_pairs(path)


def test_jsonl_pairs_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Q", "response": ""}])
    with pytest.raises(DataError, match="line 1: 'prompt' and 'response' must not be empty"):
        data.load_jsonl_pairs(path)


def test_resolve_data_dir_argument_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SKUPY_DATA_DIR", "/nonexistent/skupy-data")
    assert data.resolve_data_dir(tmp_path) == tmp_path


def test_resolve_data_dir_unset(monkeypatch):
    monkeypatch.delenv("SKUPY_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as caught:
        data.resolve_data_dir()
    message = str(caught.value)
    assert "data_dir" in message
    assert "SKUPY_DATA_DIR" in message
    assert "PKU-Alignment/PKU-SafeRLHF" in message
    assert "TruthfulQA" in message


def test_resolve_data_dir_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        data.resolve_data_dir(tmp_path / "absent")


def test_load_sku_data_small_folder(tmp_path):
    loaded = data.load_sku_data(small_data_folder(tmp_path), seed=5)
    assert [p.question for p in loaded.harmful_train] == ["How do I pick a lock?", "Q2?"]
    assert len(loaded.harmful_test) == 1
    assert len(loaded.normal_train) + len(loaded.normal_val) + len(loaded.normal_test) == 40
    assert len(loaded.normal_train) == 28
    assert loaded.split_seed == 5


def test_load_sku_data_missing_pku_file(tmp_path):
    root = small_data_folder(tmp_path)
    (root / "pku-saferlhf" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError) as caught:
        data.load_sku_data(root)
    message = str(caught.value)
    assert str(root / "pku-saferlhf" / "test.jsonl") in message
    assert "PKU-Alignment/PKU-SafeRLHF" in message


def test_load_sku_data_missing_truthfulqa(tmp_path):
    root = small_data_folder(tmp_path)
    (root / "truthfulqa" / "TruthfulQA.csv").unlink()
    with pytest.raises(FileNotFoundError, match="TruthfulQA CSV not found"):
        data.load_sku_data(root)


def test_load_sku_data_parquet_split(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    root = small_data_folder(tmp_path)
    (root / "pku-saferlhf" / "test.jsonl").unlink()
    parquet.write_table(pyarrow.Table.from_pylist([pku_record("Parquet Q?")]), root / "pku-saferlhf" / "test.parquet")
    loaded = data.load_sku_data(root)
    assert [p.question for p in loaded.harmful_test] == ["Parquet Q?"]
