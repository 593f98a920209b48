"""Loaders for SKU's question-answer data.

SKU needs three kinds of data:

* harmful pairs: prompts from PKU-SafeRLHF with each response that annotators
  labelled unsafe (the text the harmful model is trained on before negation);
* normal pairs: TruthfulQA questions with their truthful answers (the text on
  which the harmful model is kept close to the original one);
* optionally, users' own pairs as JSON Lines of {"prompt", "response"}.

The datasets are not shipped with skupy: PKU-SafeRLHF is licensed for
non-commercial research only. Point skupy at a data folder laid out as::

    DATA_DIR/pku-saferlhf/train.jsonl   PKU-SafeRLHF records, the unlearning set
    DATA_DIR/pku-saferlhf/test.jsonl    held-out harmful prompts
    DATA_DIR/truthfulqa/TruthfulQA.csv  the official TruthfulQA CSV

with the ``data_dir`` argument or the SKUPY_DATA_DIR environment variable.
The PKU-SafeRLHF files may also be ``.json``, ``.parquet`` or ``.jsonl.gz``.

All question and answer texts are stripped of leading and trailing whitespace.
"""
from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DATA_DIR_ENV = "SKUPY_DATA_DIR"
PKU_SAFERLHF_HUB_NAME = "PKU-Alignment/PKU-SafeRLHF"
TRUTHFULQA_HOMEPAGE = "https://github.com/sylinrl/TruthfulQA"
PKU_SAFERLHF_FOLDER = "pku-saferlhf"
TRUTHFULQA_FILE = Path("truthfulqa") / "TruthfulQA.csv"
PKU_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz")
PKU_REQUIRED_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")
TRUTHFULQA_REQUIRED_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


class DataError(ValueError):
    """A data file that exists but cannot be used: malformed, empty or missing a field."""


@dataclass(frozen=True)
class QAPair:
    """One question with one answer.

    ``source`` names the dataset ("pku-saferlhf", "truthfulqa", or the file
    for users' data) and ``record`` is the 0-based index of the record or
    question that the pair came from, or -1 when unknown.
    """

    question: str
    answer: str
    source: str = ""
    record: int = -1


@dataclass(frozen=True)
class LabelledResponse:
    """A prompt with one response and its human safety label, for training a safety judge."""

    prompt: str
    response: str
    is_safe: bool
    source: str = ""
    record: int = -1


@dataclass
class SafetyLabelledData:
    """The pairs and labelled responses read from one PKU-SafeRLHF file or split.

    ``harmful_pairs`` contains one pair per response labelled unsafe, in record
    order and response_0 before response_1, so a response that several records
    repeat appears once per record. ``labelled_responses`` holds every
    response, safe or not.
    """

    harmful_pairs: list
    labelled_responses: list
    num_records: int
    origin: str

    @property
    def harmful_answers(self) -> list:
        """Distinct unsafe responses in first-appearance order; see harmful_answer_pool."""
        return harmful_answer_pool(self.harmful_pairs)


@dataclass(frozen=True)
class TruthfulQAQuestion:
    """One TruthfulQA question with the answer lists used by multiple-choice scoring.

    MC1 compares ``best_answer`` against ``incorrect_answers``, MC2 compares
    ``correct_answers`` against ``incorrect_answers``. The lists are the CSV
    cells split at ";" with empty entries dropped, and nothing is added to them.
    ``index`` is the 0-based row of the question in the CSV.
    """

    question: str
    best_answer: str
    correct_answers: tuple
    incorrect_answers: tuple
    type: str = ""
    category: str = ""
    source: str = ""
    index: int = -1


@dataclass
class SKUData:
    """Everything SKU training and evaluation read from the data folder.

    ``harmful_train`` and ``labelled_train`` come from pku-saferlhf/train,
    ``harmful_test`` and ``labelled_test`` from pku-saferlhf/test, and the
    normal splits from TruthfulQA pairs split by ``split_pairs``.
    """

    harmful_train: list
    harmful_test: list
    labelled_train: list
    labelled_test: list
    normal_train: list
    normal_val: list
    normal_test: list
    truthfulqa: list
    data_dir: Optional[Path] = None
    split_seed: int = 0

    @property
    def harmful_answer_pool(self) -> list:
        """Distinct unsafe training responses, the pool random disassociation draws from."""
        return harmful_answer_pool(self.harmful_train)


def harmful_answer_pool(pairs: Iterable[QAPair]) -> list:
    """Return the distinct answers of ``pairs`` in first-appearance order.

    The published SKU code samples random answers from the list of all unsafe
    responses, duplicates included, so a response repeated across records is
    drawn more often. skupy samples from the distinct responses instead.
    """
    return list(dict.fromkeys(pair.answer for pair in pairs))


# ---------------------------------------------------------------------------
# Reading records


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def iter_jsonl(path: PathLike) -> Iterator[tuple]:
    """Yield (line_number, object) for each non-blank line of a JSON Lines file.

    Line numbers are 1-based. A line that is not valid JSON, or not a JSON
    object, raises DataError naming the file and the line. A file that is not
    UTF-8 text, or a .gz file that is not valid gzip, raises DataError naming the file.
    """
    path = Path(path)
    try:
        with _open_text(path) as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
                except RecursionError:
                    raise DataError(f"{path}, line {line_number}: invalid JSON (nested too deeply)") from None
                if not isinstance(value, dict):
                    raise DataError(f"{path}, line {line_number}: expected a JSON object, found {type(value).__name__}")
                yield line_number, value
    except UnicodeDecodeError as error:
        # Text files decode ahead of the line being read, so no line number is given.
        raise DataError(f"{path}: the file is not UTF-8 text ({error.reason})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: invalid gzip file ({error})") from None


def _read_json_records(path: Path) -> list:
    """Read a .json file holding a list of objects or an object with a "data" list."""
    try:
        with open(path, "r", encoding="utf-8") as stream:
            value = json.load(stream)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: the file is not UTF-8 text ({error.reason})") from None
    if isinstance(value, dict) and "data" in value:
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records or an object with a \"data\" list, "
                        f"found {type(value).__name__}")
    for number, record in enumerate(value, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {number}: expected a JSON object, found {type(record).__name__}")
    return value


def _read_parquet_records(path: Path) -> list:
    """Read a .parquet file into a list of dicts with pyarrow, else pandas."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        parquet = None
    if parquet is not None:
        return parquet.read_table(path).to_pylist()

    try:
        import pandas
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow or pandas with a parquet engine; "
                          "install one with `pip install pyarrow`") from None
    frame = pandas.read_parquet(path)
    # pandas returns numpy scalars, so labels are turned back into Python values.
    return [{key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()}
            for row in frame.to_dict("records")]


def read_records(path: PathLike) -> list:
    """Read (location, record) pairs from a .jsonl, .jsonl.gz, .json or .parquet file.

    The location is "line N" for JSON Lines and "record N" otherwise, both
    1-based, and is used in error messages.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return [(f"line {number}", record) for number, record in iter_jsonl(path)]
    if name.endswith(".json"):
        records = _read_json_records(path)
    elif name.endswith(".parquet"):
        records = _read_parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(PKU_FILE_SUFFIXES)}")
    return [(f"record {number}", record) for number, record in enumerate(records, start=1)]


# ---------------------------------------------------------------------------
# PKU-SafeRLHF


def _require_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    return value.strip()


def _require_label(record: dict, key: str, where: str) -> bool:
    value = record.get(key)
    # The dataset stores booleans. Integers 0 and 1 are accepted too, because
    # some exports write labels as integers.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: field {key!r} must be true or false, found {value!r}")


def safety_data_from_records(records: Iterable[tuple], origin: str, source: str = "pku-saferlhf",
                             deduplicate: bool = False) -> SafetyLabelledData:
    """Build harmful pairs and labelled responses from PKU-SafeRLHF records.

    ``records`` yields (location, record) pairs, where the location (such as
    "line 3") is used in error messages after ``origin``. Each record needs the
    fields prompt, response_0, response_1, is_response_0_safe and
    is_response_1_safe; other fields are ignored. Every response labelled
    unsafe becomes one harmful pair. With ``deduplicate``, a (prompt, response)
    pair already seen is not repeated. Responses or prompts that are empty
    after stripping are skipped and counted in one warning.

    Raises DataError for a record without a required field, and when there
    are no records or no response is labelled unsafe.
    """
    harmful, labelled = [], []
    seen = set()
    num_records = 0
    num_empty = 0
    for record_index, (location, record) in enumerate(records):
        where = f"{origin}, {location}"
        missing = [key for key in PKU_REQUIRED_FIELDS if key not in record]
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(missing)}; "
                            f"PKU-SafeRLHF records need {', '.join(PKU_REQUIRED_FIELDS)}")
        num_records += 1
        prompt = _require_text(record, "prompt", where)
        for response_index in (0, 1):
            response = _require_text(record, f"response_{response_index}", where)
            is_safe = _require_label(record, f"is_response_{response_index}_safe", where)
            if not prompt or not response:
                num_empty += 1
                continue
            labelled.append(LabelledResponse(prompt, response, is_safe, source, record_index))
            if is_safe:
                continue
            if deduplicate:
                if (prompt, response) in seen:
                    continue
                seen.add((prompt, response))
            harmful.append(QAPair(prompt, response, source, record_index))

    if num_records == 0:
        raise DataError(f"{origin}: contains no records")
    if num_empty:
        logger.warning("%s: skipped %d responses whose prompt or response text is empty", origin, num_empty)
    if not harmful:
        raise DataError(f"{origin}: none of the {num_records} records has a response labelled unsafe "
                        "(is_response_0_safe or is_response_1_safe false), so there are no harmful pairs")
    return SafetyLabelledData(harmful, labelled, num_records, origin)


def load_pku_saferlhf(path: PathLike, deduplicate: bool = False) -> SafetyLabelledData:
    """Load harmful pairs and labelled responses from one PKU-SafeRLHF file.

    The file contains records in the dataset's own schema as .jsonl (or
    .jsonl.gz), .json (a list, or an object with a "data" list) or .parquet
    (needs pyarrow or pandas). See safety_data_from_records for what is built
    and which errors are raised. A missing file raises FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PKU-SafeRLHF file not found: {path}")
    return safety_data_from_records(read_records(path), str(path), deduplicate=deduplicate)


def load_pku_saferlhf_from_hub(split: str = "train", hub_name: str = PKU_SAFERLHF_HUB_NAME,
                               revision: Optional[str] = None, deduplicate: bool = False) -> SafetyLabelledData:
    """Download PKU-SafeRLHF with the Hugging Face `datasets` package and load one split.

    Needs `pip install datasets` and network access. The hub's records use the
    same schema as the local files, plus columns that are ignored here.
    """
    # NOTE: no test runs this path, because tests have no network access.
    try:
        import datasets
    except ImportError:
        raise ImportError("loading PKU-SafeRLHF from the Hugging Face hub needs the `datasets` package; "
                          "install it with `pip install datasets`, or put the records in a local file") from None
    dataset = datasets.load_dataset(hub_name, split=split, revision=revision)
    records = ((f"row {number}", dict(row)) for number, row in enumerate(dataset, start=1))
    return safety_data_from_records(records, f"{hub_name} split {split!r}", deduplicate=deduplicate)


# ---------------------------------------------------------------------------
# TruthfulQA


def split_answer_cell(cell: str) -> list:
    """Split a TruthfulQA answers cell ("a; b; c") into stripped, non-empty answers.

    Some cells end with a trailing ";", which yields no empty answer.
    """
    return [answer.strip() for answer in cell.split(";") if answer.strip()]


def load_truthfulqa(path: PathLike) -> list:
    """Load the official TruthfulQA CSV as a list of TruthfulQAQuestion.

    The CSV needs the columns Question, Best Answer, Correct Answers and
    Incorrect Answers; Type, Category and Source are kept when present.
    Raises FileNotFoundError for a missing file and DataError for text that
    is not UTF-8 or not valid CSV (including a cell over the csv module's field
    size limit), a missing column, an empty Question or Best Answer cell, or a
    file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TruthfulQA CSV not found: {path}; download TruthfulQA.csv from {TRUTHFULQA_HOMEPAGE}")

    questions = []
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as stream:
            reader = csv.DictReader(stream)
            columns = reader.fieldnames or []
            missing = [name for name in TRUTHFULQA_REQUIRED_COLUMNS if name not in columns]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                                f"found {', '.join(columns) if columns else 'no header'}")
            for row in reader:
                # line_num is the line on which the row ends, so it points at the row even when cells span lines.
                where = f"{path}, line {reader.line_num}"
                question = (row["Question"] or "").strip()
                best_answer = (row["Best Answer"] or "").strip()
                if not question or not best_answer:
                    raise DataError(f"{where}: Question and Best Answer must not be empty")
                questions.append(TruthfulQAQuestion(
                    question=question,
                    best_answer=best_answer,
                    correct_answers=tuple(split_answer_cell(row["Correct Answers"] or "")),
                    incorrect_answers=tuple(split_answer_cell(row["Incorrect Answers"] or "")),
                    type=(row.get("Type") or "").strip(),
                    category=(row.get("Category") or "").strip(),
                    source=(row.get("Source") or "").strip(),
                    index=len(questions),
                ))
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: invalid CSV ({error})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: the file is not UTF-8 text ({error.reason})") from None
    if not questions:
        raise DataError(f"{path}: contains no questions")
    return questions


def truthfulqa_pairs(questions: Iterable[TruthfulQAQuestion]) -> list:
    """Turn TruthfulQA questions into normal QA pairs.

    Each question gives one pair with its best answer, then one pair per
    entry of its correct answers. An answer equal to one already paired with
    the question is skipped, because the best answer is usually also listed
    among the correct answers. The published SKU code instead made one pair
    with the whole unsplit Correct Answers cell as its answer.
    """
    pairs = []
    for item in questions:
        for answer in dict.fromkeys((item.best_answer,) + tuple(item.correct_answers)):
            pairs.append(QAPair(item.question, answer, "truthfulqa", item.index))
    return pairs


def split_counts(total: int, fractions: Sequence[float]) -> tuple:
    """Return (train, val, test) sizes: floor(total * fraction) for train and val, the rest for test."""
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"split fractions must be three finite non-negative numbers, got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)})")
    # The small epsilon keeps exact products such as 0.7 * 10 from flooring to 6.
    num_train = math.floor(total * fractions[0] + 1e-9)
    num_val = math.floor(total * fractions[1] + 1e-9)
    return num_train, num_val, total - num_train - num_val


def split_pairs(pairs: Sequence[QAPair], seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                by_question: bool = False) -> tuple:
    """Shuffle pairs with a seed and split them into (train, val, test) lists.

    The result depends only on the seed and the input order. The procedure is
    ``order = numpy.random.default_rng(seed).permutation(n)``. With the
    default fractions, the first floor(n * 0.7) indices of ``order`` are
    train, the next floor(n * 0.1) are val and the rest are test. Each list
    keeps the permuted order.

    By default n counts pairs, as in the published SKU code, so pairs of one
    question can land in different splits. With ``by_question``, n counts the
    distinct questions (in first-appearance order), the permutation and the
    sizes apply to questions, and every pair goes to its question's split.
    """
    rng = np.random.default_rng(seed)
    if not by_question:
        order = rng.permutation(len(pairs))
        num_train, num_val, _ = split_counts(len(pairs), fractions)
        train = [pairs[i] for i in order[:num_train]]
        val = [pairs[i] for i in order[num_train:num_train + num_val]]
        test = [pairs[i] for i in order[num_train + num_val:]]
        return train, val, test

    questions = list(dict.fromkeys(pair.question for pair in pairs))
    grouped = {question: [] for question in questions}
    for pair in pairs:
        grouped[pair.question].append(pair)
    order = rng.permutation(len(questions))
    num_train, num_val, _ = split_counts(len(questions), fractions)
    train, val, test = [], [], []
    for rank, question_index in enumerate(order):
        if rank < num_train:
            target = train
        elif rank < num_train + num_val:
            target = val
        else:
            target = test
        target.extend(grouped[questions[question_index]])
    return train, val, test


# ---------------------------------------------------------------------------
# Users' own pairs


def load_jsonl_pairs(path: PathLike, question_key: str = "prompt", answer_key: str = "response",
                     source: Optional[str] = None) -> list:
    """Load QA pairs from a JSON Lines file of {question_key: str, answer_key: str} objects.

    Other keys are ignored. A missing file raises FileNotFoundError, and a
    line without either key, with a non-string value or with empty text
    raises DataError naming the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA pairs file not found: {path}")
    source = str(path) if source is None else source
    pairs = []
    for record_index, (line_number, record) in enumerate(iter_jsonl(path)):
        where = f"{path}, line {line_number}"
        missing = [key for key in (question_key, answer_key) if key not in record]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}; found {', '.join(record) or 'none'}")
        question = _require_text(record, question_key, where)
        answer = _require_text(record, answer_key, where)
        if not question or not answer:
            raise DataError(f"{where}: {question_key!r} and {answer_key!r} must not be empty")
        pairs.append(QAPair(question, answer, source, record_index))
    if not pairs:
        raise DataError(f"{path}: contains no records")
    return pairs


# ---------------------------------------------------------------------------
# The data folder


def resolve_data_dir(data_dir: Optional[PathLike] = None) -> Path:
    """Return the data folder: ``data_dir`` if given, else $SKUPY_DATA_DIR.

    Raises FileNotFoundError when neither is set or the folder does not exist.
    """
    if data_dir is None or str(data_dir) == "":
        from_env = os.environ.get(DATA_DIR_ENV, "")
        if not from_env:
            raise FileNotFoundError(
                f"no data folder given: pass data_dir (--data-dir on the command line) or set {DATA_DIR_ENV}. "
                f"The folder needs {PKU_SAFERLHF_FOLDER}/train.jsonl and test.jsonl (PKU-SafeRLHF records, "
                f"Hugging Face dataset {PKU_SAFERLHF_HUB_NAME}) and {TRUTHFULQA_FILE.as_posix()} "
                f"(from {TRUTHFULQA_HOMEPAGE})")
        data_dir = from_env
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder not found: {path}")
    return path


def find_pku_split_file(data_dir: PathLike, split: str) -> Path:
    """Return DATA_DIR/pku-saferlhf/SPLIT with the first suffix of PKU_FILE_SUFFIXES that exists.

    Raises FileNotFoundError naming the expected .jsonl path and how to obtain the data.
    """
    folder = Path(data_dir) / PKU_SAFERLHF_FOLDER
    for suffix in PKU_FILE_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    expected = folder / f"{split}.jsonl"
    raise FileNotFoundError(
        f"PKU-SafeRLHF {split} file not found: {expected} (also tried {', '.join(PKU_FILE_SUFFIXES[1:])}). "
        f"Export the {split!r} split of the Hugging Face dataset {PKU_SAFERLHF_HUB_NAME} there in its own "
        "record schema (prompt, response_0, response_1, is_response_0_safe, is_response_1_safe), "
        "or pass allow_hub=True with the `datasets` package installed and network access")


def load_sku_data(data_dir: Optional[PathLike] = None, seed: int = 0,
                  split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS, split_by_question: bool = False,
                  deduplicate_harmful: bool = False, allow_hub: bool = False) -> SKUData:
    """Load the harmful and normal data that SKU trains and evaluates on.

    ``data_dir`` is resolved by resolve_data_dir. Harmful data comes from
    pku-saferlhf/train and pku-saferlhf/test. With ``allow_hub``, a missing
    local PKU-SafeRLHF file is replaced by the split of the same name from the
    Hugging Face hub (needs `datasets` and network access). Normal data is
    truthfulqa/TruthfulQA.csv turned into pairs by truthfulqa_pairs and split
    by split_pairs with ``seed``, ``split_fractions`` and ``split_by_question``.
    """
    root = resolve_data_dir(data_dir)

    harmful = {}
    for split in ("train", "test"):
        try:
            path = find_pku_split_file(root, split)
        except FileNotFoundError:
            if not allow_hub:
                raise
            logger.info("no local PKU-SafeRLHF %s file in %s; loading %s from the hub", split, root,
                        PKU_SAFERLHF_HUB_NAME)
            harmful[split] = load_pku_saferlhf_from_hub(split, deduplicate=deduplicate_harmful)
            continue
        harmful[split] = load_pku_saferlhf(path, deduplicate=deduplicate_harmful)

    questions = load_truthfulqa(root / TRUTHFULQA_FILE)
    normal_train, normal_val, normal_test = split_pairs(truthfulqa_pairs(questions), seed, split_fractions,
                                                        by_question=split_by_question)
    return SKUData(
        harmful_train=harmful["train"].harmful_pairs,
        harmful_test=harmful["test"].harmful_pairs,
        labelled_train=harmful["train"].labelled_responses,
        labelled_test=harmful["test"].labelled_responses,
        normal_train=normal_train,
        normal_val=normal_val,
        normal_test=normal_test,
        truthfulqa=questions,
        data_dir=root,
        split_seed=seed,
    )
