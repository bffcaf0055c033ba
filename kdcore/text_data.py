"""Text classification data: rows → labelled examples → token ids, held compactly, batched by length.

Each split is tokenised once with the teacher's tokenizer into one flat int32 tensor plus offsets
(a ragged array: a sentence of 9 tokens costs 9 ints, not `max_length`), and stored sorted by
length, so an evaluation pass pads each batch only to its own longest sentence. Training batches
are drawn by length bucket: a shuffled epoch is cut into chunks of `BUCKET_BATCHES` batches, each
chunk sorted by length and split, and the batches shuffled again, so short sentences do not pay
for long ones and every batch still mixes the data (as transformers' `group_by_length` does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import BadInputError, MismatchError
from kdcore.spec import DataSpec
from kdcore.text_sniff import TextFormat, detect_format, read_rows

BUCKET_BATCHES = 50
_MAX_LISTED = 5


@dataclass
class TokenBatch:
    """What a text model takes: padded token ids, their mask and (for BERT-style pairs) segment ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TokenBatch:
        type_ids = self.token_type_ids.to(device) if self.token_type_ids is not None else None
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), type_ids)


@dataclass
class Examples:
    """Rows of one file as texts and class indices, with the row numbers they came from."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples([self.texts[i] for i in indices],
                        [self.pairs[i] for i in indices] if self.pairs is not None else None,
                        [self.labels[i] for i in indices], [self.rows[i] for i in indices])


@dataclass
class TokenizedSplit:
    """One split, tokenised: flat ids, offsets into them, labels; examples sorted by token count."""

    tokens: torch.Tensor  # int32, all examples' ids end to end
    type_ids: torch.Tensor | None  # int8 segment ids, where the tokenizer makes them
    offsets: torch.Tensor  # int64, N + 1
    labels: torch.Tensor  # int64, N
    texts: list[str]
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class TextData:
    train: TokenizedSplit
    val: TokenizedSplit | None
    test: TokenizedSplit | None
    class_names: list[str]
    source: str
    max_length: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TokenBatches:
    """`kdcore.batches.Batches` over a tokenised split: length-bucketed training, sorted evaluation."""

    def __init__(self, split: TokenizedSplit, *, pad_id: int, device: torch.device) -> None:
        self.split = split
        self.pad_id = pad_id
        self.device = device
        self.labels = split.labels.to(device)

    def __len__(self) -> int:
        return len(self.split)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.split) / batch_size)

    def epoch_order(self, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(len(self.split), generator=rng)
        lengths = self.split.lengths
        chunk = batch_size * BUCKET_BATCHES  # a multiple of the batch: only the very last batch is short
        batches: list[torch.Tensor] = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[torch.argsort(lengths[part], stable=True)]
            batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
        shuffled = torch.randperm(len(batches), generator=rng)
        return [batches[i] for i in shuffled.tolist()]

    def train_batch(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[TokenBatch, torch.Tensor]:
        return self.collate(indices), self.labels[indices.to(self.device)]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[TokenBatch, torch.Tensor]]:
        for start in range(0, len(self.split), batch_size):
            indices = torch.arange(start, min(start + batch_size, len(self.split)))
            yield self.collate(indices), self.labels[start:start + batch_size]

    def collate(self, indices: torch.Tensor) -> TokenBatch:
        return collate(self.split, indices.cpu(), pad_id=self.pad_id).to(self.device)


def collate(split: TokenizedSplit, indices: torch.Tensor, *, pad_id: int) -> TokenBatch:
    starts, ends = split.offsets[indices], split.offsets[indices + 1]
    width = int((ends - starts).max().item()) if len(indices) else 0
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    type_ids = torch.zeros((len(indices), width), dtype=torch.long) if split.type_ids is not None else None
    for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        input_ids[row, :end - start] = split.tokens[start:end]
        mask[row, :end - start] = 1
        if type_ids is not None and split.type_ids is not None:
            type_ids[row, :end - start] = split.type_ids[start:end]
    return TokenBatch(input_ids, mask, type_ids)


# --- reading ------------------------------------------------------------------------------------


def text_format(path: Path, what: str) -> TextFormat:
    with path.open("rb") as handle:
        head = handle.read(64 * 1024)
    fmt = detect_format(head)
    if fmt is None:
        raise BadInputError("not a text dataset: give .jsonl rows ({\"text\": ..., \"label\": ...}) or a .csv/.tsv "
                            "with a header line", field=what)
    return fmt


def read_examples(path: Path, spec: DataSpec, *, what: str) -> tuple[list[str], list[str] | None, list[Any], list[int]]:
    """Texts, pairs, raw labels and row numbers; a row missing a field or with an empty text is refused."""
    fields = [(spec.text_field, "data.text_field")]
    if spec.text_pair_field is not None:
        fields.append((spec.text_pair_field, "data.text_pair_field"))
    texts: list[str] = []
    pairs: list[str] | None = [] if spec.text_pair_field is not None else None
    labels: list[Any] = []
    rows: list[int] = []
    problems: list[str] = []
    for number, row in read_rows(path, text_format(path, what), what=what):
        values = []
        for name, setting in fields:
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                state = "is missing" if name not in row else "is empty" if isinstance(value, str) else "is not text"
                problems.append(f"row {number}: {name!r} {state} (the {setting})")
            values.append(value if isinstance(value, str) else "")
        label = row.get(spec.label_field)
        if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, bool | float | list
                                                                                           | dict):
            problems.append(f"row {number}: label {spec.label_field!r} is missing or not a name or an integer "
                            "(the data.label_field)")
        if len(problems) >= _MAX_LISTED:
            break
        texts.append(values[0])
        if pairs is not None:
            pairs.append(values[1])
        labels.append(label.strip() if isinstance(label, str) else label)
        rows.append(number)
    if problems:
        columns = ", ".join(sorted({key for _, row in read_rows(path, text_format(path, what), what=what)
                                    for key in row})[:20])
        raise BadInputError(f"{'; '.join(problems)}. Its fields: {columns}", field=what)
    return texts, pairs, labels, rows


def label_space(train: list[Any], test: list[Any] | None, teacher_labels: list[str] | None) -> list[str]:
    """The class names, in the order of the model's outputs.

    A teacher with named labels fixes the order (the data's labels are matched to them by name, or
    are indices into them); integer labels are class indices; otherwise names are sorted, so every
    run orders them alike. A head of generic `LABEL_i` names takes the data's order.
    """
    every = [*train, *(test or [])]
    seen = list(dict.fromkeys(str(label) for label in every))
    if teacher_labels is not None and not _generic(teacher_labels):
        return list(teacher_labels)
    if all(isinstance(label, int) or (isinstance(label, str) and label.isdigit()) for label in every):
        count = max(int(label) for label in seen) + 1
        names = [str(index) for index in range(max(count, len(teacher_labels or [])))]
    else:
        names = sorted(seen)
    if teacher_labels is not None and len(names) != len(teacher_labels):
        raise MismatchError(f"the teacher has {len(teacher_labels)} outputs, the data {len(names)} classes",
                            field="data.label_field")
    return names


def _generic(labels: list[str]) -> bool:
    return all(label == f"LABEL_{index}" for index, label in enumerate(labels))


def to_indices(raw: list[Any], rows: list[int], class_names: list[str], *, what: str,
               teacher_named: bool) -> list[int]:
    index = {name: i for i, name in enumerate(class_names)}
    indices, unknown = [], []
    for label, row in zip(raw, rows, strict=True):
        key = str(label)
        if key in index:
            indices.append(index[key])
        elif (isinstance(label, int) or key.isdigit()) and int(key) < len(class_names):
            indices.append(int(key))
        else:
            unknown.append(f"row {row}: {key!r}")
    if unknown:
        whose = "the teacher's labels" if teacher_named else "the training labels"
        raise MismatchError(f"labels not among {whose} ({', '.join(class_names[:20])}): "
                            f"{', '.join(unknown[:_MAX_LISTED])}", field=what)
    return indices


# --- tokenising --------------------------------------------------------------------------------------


def tokenize(examples: Examples, tokenizer: Any, *, max_length: int, batch: int = 4096) -> TokenizedSplit:
    """Tokenise with the teacher's tokenizer (truncating to max_length), then sort by length."""
    ids: list[list[int]] = []
    types: list[list[int]] | None = []
    truncated = 0
    for start in range(0, len(examples), batch):
        texts = examples.texts[start:start + batch]
        pairs = examples.pairs[start:start + batch] if examples.pairs is not None else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_overflowing_tokens=False,
                            return_length=False)
        full = tokenizer(texts, pairs, truncation=False, return_attention_mask=False, return_token_type_ids=False)
        truncated += sum(len(f) > max_length for f in full["input_ids"])
        ids.extend(encoded["input_ids"])
        if types is not None:
            if "token_type_ids" in encoded:
                types.extend(encoded["token_type_ids"])
            else:
                types = None
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    lengths = torch.tensor([len(ids[i]) for i in order], dtype=torch.int64)
    offsets = torch.zeros(len(order) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.tensor([token for i in order for token in ids[i]], dtype=torch.int32)
    flat_types = (torch.tensor([t for i in order for t in types[i]], dtype=torch.int8)
                  if types is not None and types else None)
    labels = torch.tensor([examples.labels[i] for i in order], dtype=torch.int64)
    texts = [_display(examples, i) for i in order]
    return TokenizedSplit(flat, flat_types, offsets, labels, texts, truncated)


def _display(examples: Examples, index: int) -> str:
    if examples.pairs is None:
        return examples.texts[index]
    return f"{examples.texts[index]} [SEP] {examples.pairs[index]}"


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation: `fraction` of every class (at least one where it has two or more)."""
    if fraction <= 0:
        return list(range(len(labels))), []
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        take = round(len(members) * fraction) if len(members) > 1 else 0
        take = max(take, 1) if len(members) > 1 else 0
        val.extend(shuffled[:take])
        train.extend(shuffled[take:])
    return sorted(train), sorted(val)


def load_text_data(spec: DataSpec, *, train_path: Path, test_path: Path | None, tokenizer: Any, seed: int,
                   teacher_labels: list[str] | None, source: str | None = None) -> TextData:
    texts, pairs, raw, rows = read_examples(train_path, spec, what="data.train")
    test_read = read_examples(test_path, spec, what="data.test") if test_path is not None else None
    class_names = label_space(raw, test_read[2] if test_read else None, teacher_labels)
    if len(class_names) < 2:
        raise BadInputError(f"the labels ({spec.label_field!r}) hold one class only: {class_names}",
                            field="data.label_field")
    named = teacher_labels is not None
    labels = to_indices(raw, rows, class_names, what="data.train", teacher_named=named)
    everything = Examples(texts, pairs, labels, rows)
    train_idx, val_idx = stratified_split(labels, spec.val_fraction, seed)
    test = None
    if test_read is not None:
        test_labels = to_indices(test_read[2], test_read[3], class_names, what="data.test", teacher_named=named)
        test = tokenize(Examples(test_read[0], test_read[1], test_labels, test_read[3]), tokenizer,
                        max_length=spec.max_length)
    train = tokenize(everything.subset(train_idx), tokenizer, max_length=spec.max_length)
    val = tokenize(everything.subset(val_idx), tokenizer, max_length=spec.max_length) if val_idx else None
    return TextData(train=train, val=val, test=test, class_names=class_names,
                    source=source or train_path.name, max_length=spec.max_length,
                    info={"truncated": train.truncated + (test.truncated if test else 0)})
