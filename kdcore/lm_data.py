"""Causal language-model data: rows → token sequences with a loss mask, held flat, batched with labels.

The kind of data is chosen by the fields of the first row, and every row must be of that kind:

- text (`data.text_field`, or a plain .txt file): language modelling. Each document's tokens and
  an eos, end to end, cut into blocks of `max_length` (packing, as GPT-2 was trained); every token
  is a target.
- prompt + completion: one sequence per row; the loss on the completion tokens (and its eos) only.
- messages: a chat, rendered by the tokenizer's chat template; the loss on the assistant turns only.
- prompt alone: valid for `seq_kd` only, whose teacher writes the completions.

A split is one flat int32 tensor of token ids, a flat bool tensor saying which tokens are targets,
and int64 offsets (a ragged array: a 9-token row costs 9 ints, not `max_length`). Labels are made
per batch, already shifted: `labels[t]` is token t+1 where that token is a target, else -100, so
the logits at position t are scored against `labels[t]` with no further shifting.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import BadInputError
from kdcore.spec import DataSpec
from kdcore.text_data import BUCKET_BATCHES
from kdcore.text_sniff import LMKind, lm_kind_of, read_rows

IGNORE = -100
_MAX_LISTED = 5
_TOKENIZE_BATCH = 1024
_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass
class LMSplit:
    """One split, tokenised: flat ids, which of them are targets, offsets; each row's prompt length."""

    tokens: torch.Tensor  # int32, every sequence end to end
    targets: torch.Tensor  # bool, the same length: the token is predicted by the loss
    offsets: torch.Tensor  # int64, N + 1
    prompt_lengths: torch.Tensor  # int64, N: tokens before the first target (what samples continue)
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def sequence(self, index: int) -> list[int]:
        return self.tokens[int(self.offsets[index]):int(self.offsets[index + 1])].tolist()

    def label_counts(self) -> torch.Tensor:
        """Scored positions per sequence: targets after its first token (nothing predicts the first)."""
        running = torch.zeros(len(self.targets) + 1, dtype=torch.int64)
        running[1:] = torch.cumsum(self.targets.to(torch.int64), 0)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        return running[ends] - running[torch.minimum(starts + 1, ends)]


@dataclass
class LMData:
    train: LMSplit
    val: LMSplit | None
    test: LMSplit | None
    kind: LMKind
    source: str
    max_length: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LMBatch:
    """What a causal LM takes, and its shifted labels (-100 where nothing is scored)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


Sequence_ = tuple[list[int], list[bool], int]  # ids, targets, prompt length


def from_sequences(rows: Sequence[Sequence_], *, truncated: int) -> LMSplit:
    lengths = torch.tensor([len(ids) for ids, _, _ in rows], dtype=torch.int64)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    tokens = torch.tensor([t for ids, _, _ in rows for t in ids], dtype=torch.int32)
    targets = torch.tensor([t for _, flags, _ in rows for t in flags], dtype=torch.bool)
    prompts = torch.tensor([p for _, _, p in rows], dtype=torch.int64)
    return LMSplit(tokens, targets, offsets, prompts, truncated)


def collate_lm(split: LMSplit, indices: torch.Tensor, *, pad_id: int) -> LMBatch:
    starts, ends = split.offsets[indices], split.offsets[indices + 1]
    width = int((ends - starts).max().item()) if len(indices) else 0
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        ids = split.tokens[start:end].long()
        input_ids[row, :end - start] = ids
        mask[row, :end - start] = 1
        scored = split.targets[start + 1:end]
        labels[row, :end - start - 1] = torch.where(scored, ids[1:], IGNORE)
    return LMBatch(input_ids, mask, labels)


class LMBatches:
    """`kdcore.batches.Batches` over a tokenised LM split: shuffled training batches, stored-order evaluation."""

    def __init__(self, split: LMSplit, *, pad_id: int, device: torch.device) -> None:
        self.split = split
        self.pad_id = pad_id
        self.device = device

    def __len__(self) -> int:
        return len(self.split)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.split) / batch_size)

    def epoch_order(self, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
        """Shuffled, then length-bucketed as text classification is (`kdcore.text_data.TokenBatches`):
        packed blocks are all one length anyway, chats and completions then pad little."""
        order = torch.randperm(len(self.split), generator=rng)
        lengths = self.split.lengths
        chunk = batch_size * BUCKET_BATCHES
        batches: list[torch.Tensor] = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[torch.argsort(lengths[part], stable=True)]
            batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=rng).tolist()]

    def train_batch(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[LMBatch, torch.Tensor]:
        batch = self.collate(indices)
        return batch, batch.labels

    def eval_batches(self, batch_size: int) -> Iterator[tuple[LMBatch, torch.Tensor]]:
        for start in range(0, len(self.split), batch_size):
            batch = self.collate(torch.arange(start, min(start + batch_size, len(self.split))))
            yield batch, batch.labels

    def collate(self, indices: torch.Tensor) -> LMBatch:
        return collate_lm(self.split, indices.cpu(), pad_id=self.pad_id).to(self.device)


# --- reading ------------------------------------------------------------------------------------------


@dataclass
class LMRow:
    number: int
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None


def is_jsonl(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8-sig", errors="replace")
    return head.lstrip().startswith("{")


def read_lm_rows(path: Path, spec: DataSpec, *, what: str) -> tuple[LMKind, list[LMRow]]:
    """The rows of a .txt (one document) or .jsonl file, all of one kind; bad rows named by number."""
    if path.suffix.lower() in (".csv", ".tsv"):
        raise BadInputError("causal_lm data is a .txt file or .jsonl rows (text, prompt + completion, or messages)",
                            field=what)
    if not is_jsonl(path):
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadInputError(f"not UTF-8 text (byte {exc.start}): save it as UTF-8", field=what) from None
        if not text.strip():
            raise BadInputError("the text file is empty", field=what)
        return "text", [LMRow(1, text=text)]
    kind: LMKind | None = None
    rows: list[LMRow] = []
    problems: list[str] = []
    for number, raw in read_rows(path, "jsonl", what=what):
        row_kind = _kind_of(raw, spec)
        if row_kind is None:
            problems.append(f"row {number}: none of {spec.text_field!r} (data.text_field), {spec.prompt_field!r} "
                            f"(data.prompt_field) or {spec.messages_field!r} (data.messages_field); its fields: "
                            f"{', '.join(sorted(raw)[:10])}")
        elif kind is None:
            kind = row_kind
        elif row_kind != kind:
            problems.append(f"row {number}: is {_KIND_WORDS[row_kind]} but the first row is {_KIND_WORDS[kind]}")
        if row_kind is not None and row_kind == kind:
            row, problem = _parse_row(number, raw, kind, spec)
            if problem:
                problems.append(problem)
            rows.append(row)
        if len(problems) >= _MAX_LISTED:
            break
    if problems:
        raise BadInputError("; ".join(problems), field=what)
    if kind is None:
        raise BadInputError("the file has no rows", field=what)
    return kind, rows


_KIND_WORDS: dict[LMKind, str] = {"text": "text", "completion": "a prompt with its completion",
                                  "chat": "messages", "prompt": "a prompt without a completion"}


def _kind_of(raw: dict[str, Any], spec: DataSpec) -> LMKind | None:
    return lm_kind_of(raw, text_field=spec.text_field, prompt_field=spec.prompt_field,
                      completion_field=spec.completion_field, messages_field=spec.messages_field)


def _parse_row(number: int, raw: dict[str, Any], kind: LMKind, spec: DataSpec) -> tuple[LMRow, str | None]:
    def text(name: str, setting: str) -> tuple[str, str | None]:
        value = raw.get(name)
        if isinstance(value, str) and value.strip():
            return value, None
        state = "is empty" if isinstance(value, str) else "is not text"
        return "", f"row {number}: {name!r} {state} (the {setting})"

    if kind == "text":
        value, problem = text(spec.text_field, "data.text_field")
        return LMRow(number, text=value), problem
    if kind in ("completion", "prompt"):
        prompt, problem = text(spec.prompt_field, "data.prompt_field")
        completion = None
        if kind == "completion":
            completion, second = text(spec.completion_field, "data.completion_field")
            problem = problem or second
        return LMRow(number, prompt=prompt, completion=completion), problem
    messages = raw.get(spec.messages_field)
    problem = _check_messages(messages, number, spec.messages_field)
    return LMRow(number, messages=messages if problem is None else []), problem


def _check_messages(messages: Any, number: int, name: str) -> str | None:
    where = f"row {number}: {name!r}"
    if not isinstance(messages, list) or not messages:
        return f"{where} is not a non-empty list of {{role, content}} (the data.messages_field)"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES \
                or not isinstance(message.get("content"), str):
            return (f"{where}[{index}] is not {{role: system|user|assistant|tool, content: text}} "
                    "(the data.messages_field)")
    if not any(message["role"] == "assistant" for message in messages):
        return f"{where} has no assistant turn: nothing to learn from it"
    return None


# --- tokenising -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _long_inputs_allowed(tokenizer: Any) -> Iterator[None]:
    """Documents are tokenised whole and packed later: the model's length warning does not apply."""
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = 1 << 40
    try:
        yield
    finally:
        tokenizer.model_max_length = previous


def _ids(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    out: list[list[int]] = []
    with _long_inputs_allowed(tokenizer):
        for start in range(0, len(texts), _TOKENIZE_BATCH):
            out.extend(tokenizer(texts[start:start + _TOKENIZE_BATCH], add_special_tokens=special,
                                 return_attention_mask=False)["input_ids"])
    return out


def _eos(tokenizer: Any) -> list[int]:
    return [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []


def pack_documents(rows: list[LMRow], tokenizer: Any, max_length: int) -> list[Sequence_]:
    """Every document then eos, end to end, in blocks of max_length; a last block of one token is dropped."""
    stream: list[int] = []
    for ids in _ids(tokenizer, [row.text or "" for row in rows], special=True):
        stream.extend(ids + _eos(tokenizer))
    blocks = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
    # A block of one token has nothing to predict; the first 16 tokens (or fewer) seed its sample.
    return [(block, [True] * len(block), min(16, len(block) // 2)) for block in blocks if len(block) > 1]


def tokenize_rows(kind: LMKind, rows: list[LMRow], tokenizer: Any, max_length: int, *,
                  what: str) -> tuple[list[Sequence_], list[int], int]:
    """(sequences, their row numbers, how many were truncated) for row data; text is packed instead."""
    if kind == "chat":
        return _tokenize_chats(rows, tokenizer, max_length, what=what)
    prompts = _ids(tokenizer, [row.prompt or "" for row in rows], special=True)
    sequences: list[Sequence_] = []
    numbers: list[int] = []
    truncated = dropped = 0
    if kind == "prompt":
        for row, prompt in zip(rows, prompts, strict=True):
            truncated += len(prompt) > max_length
            kept = prompt[-max_length:]  # the end of a prompt is what the answer follows
            sequences.append((kept, [False] * len(kept), len(kept)))
            numbers.append(row.number)
        return sequences, numbers, truncated
    completions = _ids(tokenizer, [row.completion or "" for row in rows], special=False)
    for row, prompt, completion in zip(rows, prompts, completions, strict=True):
        ids = prompt + completion + _eos(tokenizer)
        flags = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
        if len(ids) > max_length:
            truncated += 1
            ids, flags = ids[:max_length], flags[:max_length]
        if not any(flags[1:]):
            dropped += 1  # the prompt alone fills max_length: no completion token is left to learn
            continue
        sequences.append((ids, flags, len(prompt)))
        numbers.append(row.number)
    if not sequences:
        raise BadInputError(f"every prompt is at least data.max_length ({max_length}) tokens: no completion "
                            "token is left; raise data.max_length", field=what)
    return sequences, numbers, truncated + dropped


def _tokenize_chats(rows: list[LMRow], tokenizer: Any, max_length: int, *,
                    what: str) -> tuple[list[Sequence_], list[int], int]:
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError("the rows are messages but the teacher's tokenizer has no chat template: add one to "
                            "tokenizer_config.json (chat_template), or give text or prompt + completion rows",
                            field=what)
    sequences: list[Sequence_] = []
    numbers: list[int] = []
    truncated = 0
    for row in rows:
        assert row.messages is not None
        rendered, spans = _assistant_spans(tokenizer, row.messages, row.number, what)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        flags = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoded["offset_mapping"]]
        if len(ids) > max_length:
            truncated += 1
            ids, flags = ids[:max_length], flags[:max_length]
        if not any(flags[1:]):
            continue
        sequences.append((ids, flags, flags.index(True)))
        numbers.append(row.number)
    if not sequences:
        raise BadInputError(f"no assistant token is left within data.max_length ({max_length}) tokens",
                            field=what)
    return sequences, numbers, truncated


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], number: int,
                     what: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns.

    Each turn's span runs from the end of the conversation before it (rendered with the generation
    prompt, so the assistant header is not a target) to the end of the conversation through it. This
    needs only that a template renders a conversation's beginning as a prefix of the whole, which
    holds for the templates of the common families; one that does not is refused by row number.
    """
    def render(part: list[dict[str, str]], prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt))

    full = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], True), render(messages[:index + 1], False)
        if not (full.startswith(before) and full.startswith(through)) or len(through) < len(before):
            raise BadInputError(f"row {number}: the chat template does not render the conversation's beginning "
                                "as a prefix of the whole, so the assistant tokens cannot be found", field=what)
        spans.append((len(before), len(through)))
    return full, spans


def seeded_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation: `fraction` of the examples (at least one when there are two)."""
    if fraction <= 0 or count < 2:
        return list(range(count)), []
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    take = min(count - 1, max(1, round(count * fraction)))
    return sorted(order[take:]), sorted(order[:take])


def _read_split(path: Path, spec: DataSpec, tokenizer: Any, *, what: str,
                seq_kd: bool) -> tuple[LMKind, list[Sequence_], int]:
    kind, rows = read_lm_rows(path, spec, what=what)
    if kind == "prompt" and not seq_kd:
        raise BadInputError(f"row {rows[0].number}: {spec.prompt_field!r} without {spec.completion_field!r}: "
                            "prompt-only rows are for method.name seq_kd (the teacher writes the answers)",
                            field=what)
    if seq_kd and kind in ("text", "chat"):
        raise BadInputError(f"seq_kd needs prompts: rows with {spec.prompt_field!r} (a completion is optional)",
                            field=what)
    if kind == "text":
        return kind, pack_documents(rows, tokenizer, spec.max_length), 0
    sequences, _, truncated = tokenize_rows(kind, rows, tokenizer, spec.max_length, what=what)
    return kind, sequences, truncated


def load_lm_data(spec: DataSpec, *, train_path: Path, test_path: Path | None, tokenizer: Any, seed: int,
                 seq_kd: bool = False) -> LMData:
    kind, sequences, truncated = _read_split(train_path, spec, tokenizer, what="data.train", seq_kd=seq_kd)
    test = None
    if test_path is not None:
        _, test_sequences, test_truncated = _read_split(test_path, spec, tokenizer, what="data.test", seq_kd=seq_kd)
        test = from_sequences(test_sequences, truncated=test_truncated)
    train_idx, val_idx = seeded_split(len(sequences), spec.val_fraction, seed)
    train = from_sequences([sequences[i] for i in train_idx], truncated=truncated)
    val = from_sequences([sequences[i] for i in val_idx], truncated=0) if val_idx else None
    return LMData(train=train, val=val, test=test, kind=kind, source=train_path.name, max_length=spec.max_length,
                  info={"truncated": truncated + (test.truncated if test else 0),
                        "train_tokens": int(train.lengths.sum())})


def with_answers(split: LMSplit, answers: Sequence[Sequence[int]], max_length: int) -> LMSplit:
    """Each prompt followed by its answer (seq_kd's targets), the answer the only target."""
    rows: list[Sequence_] = []
    for index, answer in enumerate(answers):
        prompt = split.sequence(index)[:int(split.prompt_lengths[index])]
        ids = (prompt + list(answer))[:max_length]
        flags = ([False] * len(prompt) + [True] * len(answer))[:max_length]
        rows.append((ids, flags, len(prompt)))
    return from_sequences(rows, truncated=split.truncated)
