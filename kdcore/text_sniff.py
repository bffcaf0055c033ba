"""Text datasets (.jsonl, .csv, .tsv, .txt): reading rows with their row numbers, and a torch-free summary.

The API summarises every text upload with `sniff_text` (columns, rows, the values of short
columns, so the form can list the fields and the submission can check the labels); the engine
reads the same rows through `read_rows`, so both agree on what a row is and how it is numbered.
Row numbers are the file's line numbers (the header of a CSV is line 1), as an editor shows them.
A plain .txt file is one document for a language model (`sniff_plain_text`); `lm_kind_of` tells
which kind of language-model rows a .jsonl holds, for the submission and the engine alike.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from kdcore.errors import BadInputError

TextFormat = Literal["jsonl", "csv", "tsv"]
# causal_lm rows: language modelling, prompt + completion, a chat, or prompts alone (seq_kd).
LMKind = Literal["text", "completion", "chat", "prompt"]

MAX_ROWS = 5_000_000
MAX_COLUMNS = 256
MAX_FIELD_CHARS = 1_000_000
# Columns with at most this many distinct short values are candidate label columns: their counts are kept.
MAX_LABEL_VALUES = 1000
_MAX_LABEL_CHARS = 100


class TextDatasetInfo(BaseModel):
    """What a text dataset upload holds."""

    kind: Literal["text"] = "text"
    format: TextFormat | Literal["txt"]
    num_rows: int
    columns: list[str] = Field(description="Field names: the CSV header, or every key seen in the JSON lines.")
    value_counts: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Rows per value, for the columns that look like labels."
    )
    first_missing: dict[str, int] = Field(
        default_factory=dict, description="For columns absent or empty in some rows: the first such row."
    )
    lm_kind: LMKind | None = Field(
        default=None, description="As language-model data (the default field names): text, completion (prompt + "
        "completion), chat (messages) or prompt (prompts alone, for seq_kd); None where no such field is present.")
    num_chars: int | None = Field(default=None, description="Plain text (.txt): characters in the document.")


def lm_kind_of(fields: Iterable[str], *, text_field: str = "text", prompt_field: str = "prompt",
               completion_field: str = "completion", messages_field: str = "messages") -> LMKind | None:
    """Which kind of causal_lm rows has these fields: messages first, then prompt (with or without a
    completion), then text; None where none is there."""
    names = set(fields)
    if messages_field in names:
        return "chat"
    if prompt_field in names:
        return "completion" if completion_field in names else "prompt"
    if text_field in names:
        return "text"
    return None


def sniff_plain_text(path: str | Path, *, what: str = "file") -> TextDatasetInfo:
    """A .txt file as one language-model document: UTF-8 throughout, not empty, no NUL bytes."""
    lines = chars = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for line in handle:
                if "\x00" in line:
                    raise BadInputError(f"line {lines + 1} holds NUL bytes: not a text file", field=what)
                chars += len(line)
                lines += bool(line.strip())
    except UnicodeDecodeError as exc:
        raise BadInputError(f"not UTF-8 text (byte {exc.start} of a line): save it as UTF-8", field=what) from None
    if not lines:
        raise BadInputError("the text file is empty", field=what)
    return TextDatasetInfo(format="txt", num_rows=lines, columns=[], lm_kind="text", num_chars=chars)


def detect_format(head: bytes) -> TextFormat | None:
    """jsonl when the first non-blank line is a JSON object, else csv or tsv by the header's separator.

    None for anything that is not UTF-8 text (binary files, NUL bytes).
    """
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # only a character cut by the end of the sample is forgiven
            return None
        text = head[:exc.start].decode("utf-8-sig")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    if "\t" in first:
        return "tsv"
    if "," in first:
        return "csv"
    return None


def read_rows(path: str | Path, fmt: TextFormat, *, what: str = "data.train") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number, row) for every data row; a malformed row is a BadInputError naming its number."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if fmt == "jsonl":
                yield from _jsonl_rows(handle, what)
            else:
                yield from _csv_rows(handle, "\t" if fmt == "tsv" else ",", what)
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{what} is not UTF-8 text (byte {exc.start} of a line): save it as UTF-8",
                            field=what) from None


def _jsonl_rows(handle: io.TextIOBase, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    count = 0
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        if len(line) > MAX_FIELD_CHARS:
            raise BadInputError(f"row {number} is longer than {MAX_FIELD_CHARS} characters", field=what)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"row {number} is not valid JSON ({exc.msg})", field=what) from None
        except RecursionError:
            raise BadInputError(f"row {number} nests too deeply", field=what) from None
        if not isinstance(row, dict):
            raise BadInputError(f"row {number} is not a JSON object", field=what)
        count += 1
        if count > MAX_ROWS:
            raise BadInputError(f"more than {MAX_ROWS} rows", field=what)
        yield number, row


def _csv_rows(handle: io.TextIOBase, delimiter: str, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(MAX_FIELD_CHARS)
    reader = csv.reader(handle, delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise BadInputError("the file has no header line naming its columns", field=what)
        header = [name.strip() for name in header]
        if len(header) > MAX_COLUMNS:
            raise BadInputError(f"more than {MAX_COLUMNS} columns", field=what)
        if len(set(header)) != len(header):
            raise BadInputError(f"the header names a column twice: {header}", field=what)
        count = 0
        for values in reader:
            if not values or not any(value.strip() for value in values):
                continue
            if len(values) != len(header):
                raise BadInputError(f"row {reader.line_num} has {len(values)} values, the header {len(header)} "
                                    "columns (quote fields that hold the separator)", field=what)
            count += 1
            if count > MAX_ROWS:
                raise BadInputError(f"more than {MAX_ROWS} rows", field=what)
            yield reader.line_num, dict(zip(header, values, strict=True))
    except csv.Error as exc:
        raise BadInputError(f"row {reader.line_num}: {exc}", field=what) from None


def sniff_text(path: str | Path, fmt: TextFormat, *, what: str = "file") -> TextDatasetInfo:
    columns: dict[str, None] = {}
    values: dict[str, Counter[str]] = {}
    too_many: set[str] = set()
    present: Counter[str] = Counter()
    first_missing: dict[str, int] = {}
    rows = 0
    for number, row in read_rows(path, fmt, what=what):
        rows += 1
        for key in row:
            if key not in columns:
                columns[key] = None
                if rows > 1:
                    first_missing.setdefault(key, 1)
        if len(columns) > MAX_COLUMNS:
            raise BadInputError(f"rows have more than {MAX_COLUMNS} distinct fields", field=what)
        for key in columns:
            value = row.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                first_missing.setdefault(key, number)
                continue
            present[key] += 1
            if key in too_many:
                continue
            text = _label_text(value)
            if text is None:
                too_many.add(key)
                values.pop(key, None)
                continue
            counts = values.setdefault(key, Counter())
            counts[text] += 1
            if len(counts) > MAX_LABEL_VALUES:
                too_many.add(key)
                values.pop(key)
    if rows == 0:
        raise BadInputError("the file has no data rows", field=what)
    return TextDatasetInfo(format=fmt, num_rows=rows, columns=list(columns),
                           value_counts={key: dict(counts.most_common()) for key, counts in values.items()},
                           first_missing=first_missing, lm_kind=lm_kind_of(columns) if fmt == "jsonl" else None)


def _label_text(value: Any) -> str | None:
    """A value as a label would be written, or None where it cannot be one (long text, lists, floats)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and len(value) <= _MAX_LABEL_CHARS:
        return value.strip()
    return None
