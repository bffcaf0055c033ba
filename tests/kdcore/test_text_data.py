"""Text datasets: the torch-free summary of an upload, reading rows into examples, tokenising, length batches."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kdcore.data_sniff import sniff_dataset
from kdcore.errors import BadInputError, MismatchError
from kdcore.spec import DataSpec
from kdcore.text_data import TokenBatches, collate, load_text_data
from kdcore.text_sniff import TextDatasetInfo, detect_format, sniff_text
from tests.text_models import make_tokenizer, sentences, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(2)
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _jsonl(path: Path, rows: Sequence[Any]) -> Path:
    """Rows as JSON objects, or raw lines where a row is a string (blank lines, broken JSON)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def _load(tokenizer: Any, train: Path, test: Path | None = None, *, teacher_labels: list[str] | None = None,
          **data: Any):
    spec = DataSpec(train=str(train), test=str(test) if test else None, **{"val_fraction": 0.0, **data})
    return load_text_data(spec, train_path=train, test_path=test, tokenizer=tokenizer, seed=0,
                          teacher_labels=teacher_labels)


# --- the upload's summary (text_sniff, data_sniff.sniff_dataset) -------------------------------------------------


def test_sniff_jsonl(tmp_path: Path) -> None:
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
            {"text": "fine", "label": "pos", "source": "web"}, {"text": "", "label": "neg"},
            {"text": "dull", "label": "neg"}, {"text": "ok"}]
    path = _jsonl(tmp_path / "data.jsonl", rows)

    info = sniff_dataset(path)

    assert isinstance(info, TextDatasetInfo)
    assert info.format == "jsonl"
    assert info.num_rows == 6
    assert info.columns == ["text", "label", "source"]
    assert info.value_counts["label"] == {"neg": 3, "pos": 2}
    assert info.first_missing["text"] == 4  # the empty text
    assert info.first_missing["label"] == 6
    assert info.first_missing["source"] == 1  # absent before row 3 too


def test_sniff_counts_rows_by_line_number_past_blank_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "blank.jsonl", [{"text": "a", "label": 1}, "", "  ", {"text": "b"}])
    info = sniff_text(path, "jsonl")
    assert info.num_rows == 2
    assert info.first_missing == {"label": 4}
    assert info.value_counts["label"] == {"1": 1}


@pytest.mark.parametrize(("separator", "fmt"), [(",", "csv"), ("\t", "tsv")])
def test_sniff_csv_and_tsv(tmp_path: Path, separator: str, fmt: str) -> None:
    lines = ["text,label", "good film,1", "bad film,0", "fine,1", ",0", "great,1"]
    path = tmp_path / f"data.{fmt}"
    path.write_text("\n".join(line.replace(",", separator) for line in lines) + "\n", encoding="utf-8")

    assert detect_format(path.read_bytes()) == fmt
    info = sniff_dataset(path)

    assert isinstance(info, TextDatasetInfo)
    assert info.format == fmt
    assert info.num_rows == 5
    assert info.columns == ["text", "label"]
    assert info.value_counts["label"] == {"1": 3, "0": 2}
    assert info.first_missing == {"text": 5}  # line 5: the header is line 1


def test_sniff_drops_value_counts_of_long_text_columns(tmp_path: Path) -> None:
    rows = [{"text": "word " * 40 + str(i), "label": i % 2} for i in range(10)]
    info = sniff_text(_jsonl(tmp_path / "long.jsonl", rows), "jsonl")
    assert "text" not in info.value_counts  # a 200-character text is no label
    assert info.value_counts["label"] == {"0": 5, "1": 5}


def test_malformed_json_row_is_named_by_its_row_number(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}, "",
                                           '{"text": "c", "label": ', {"text": "d", "label": 0}])
    with pytest.raises(BadInputError) as caught:
        sniff_dataset(path)
    assert "row 4" in caught.value.message and "JSON" in caught.value.message


def test_json_row_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "list.jsonl", [{"text": "a", "label": 0}, "[1, 2]"])
    with pytest.raises(BadInputError) as caught:
        sniff_text(path, "jsonl")
    assert "row 2" in caught.value.message and "object" in caught.value.message


def test_csv_row_with_the_wrong_number_of_values_is_named_by_its_line(tmp_path: Path) -> None:
    # a quoted field over two lines first: line numbers are the file's, as an editor shows them
    path = tmp_path / "bad.csv"
    path.write_text('text,label\n"two\nlines",1\nfine,0\nthis, that,1\nok,0\n', encoding="utf-8")
    with pytest.raises(BadInputError) as caught:
        sniff_dataset(path)
    assert "row 5" in caught.value.message
    assert "3 values" in caught.value.message and "2 columns" in caught.value.message


def test_non_utf8_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé noir,1\nthé,0\n".encode("latin-1"))
    with pytest.raises(BadInputError) as caught:
        sniff_dataset(path)
    assert "UTF-8" in caught.value.message


def test_non_utf8_byte_after_the_sniffed_head_is_refused_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl"
    head = "".join(json.dumps({"text": f"row {i} " + "x" * 60, "label": i % 2}) + "\n" for i in range(2000))
    assert len(head) > 64 * 1024
    path.write_bytes(head.encode() + b'{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(BadInputError) as caught:
        sniff_dataset(path)
    assert "UTF-8" in caught.value.message


# --- rows into labelled examples (load_text_data) ------------------------------------------------------------


@pytest.mark.parametrize(("bad_row", "row_number", "words"), [
    ({"label": "pos"}, 3, ["'text'", "missing"]),
    ({"text": "   ", "label": "pos"}, 3, ["'text'", "empty"]),
    ({"text": 12, "label": "pos"}, 3, ["'text'", "not text"]),
    ({"text": "good"}, 3, ["'label'", "missing"]),
    ({"text": "good", "label": 0.5}, 3, ["'label'"]),
])
def test_bad_row_is_named_with_its_field(tokenizer: Any, tmp_path: Path, bad_row: dict, row_number: int,
                                          words: list[str]) -> None:
    rows: list[dict | str] = [{"text": "good film", "label": "pos"}, "", bad_row, {"text": "bad", "label": "neg"}]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(BadInputError) as caught:
        _load(tokenizer, path)
    message = caught.value.message
    assert f"row {row_number}:" in message
    assert all(word in message for word in words), message
    assert "row 1:" not in message and "row 4:" not in message
    assert caught.value.field == "data.train"


def test_bad_row_in_the_test_file_names_data_test(tokenizer: Any, tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    test = _jsonl(tmp_path / "test.jsonl", [{"text": "good", "label": "pos"}, {"txt": "bad", "label": "neg"}])
    with pytest.raises(BadInputError) as caught:
        _load(tokenizer, train, test)
    assert caught.value.field == "data.test" and "row 2:" in caught.value.message


def test_csv_bad_row_is_named_by_its_line(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("text,label\ngood,pos\nbad,\nfine,pos\n", encoding="utf-8")
    with pytest.raises(BadInputError) as caught:
        _load(tokenizer, path)
    assert "row 3:" in caught.value.message and "'label'" in caught.value.message


def _expected_labels(data: Any, split: Any, by_text: dict[Any, str]) -> list[int]:
    return [data.class_names.index(by_text[text]) for text in split.texts]


def test_label_names_are_sorted_and_mapped(tokenizer: Any, tmp_path: Path) -> None:
    rows = [("fun film", "zebra"), ("bad film", "apple"), ("the plot", "mango"), ("good fun", "zebra"),
            ("sad", "apple"), ("warm and bright music", "mango")]
    path = write_jsonl(tmp_path / "names.jsonl", rows)

    data = _load(tokenizer, path)

    assert data.class_names == ["apple", "mango", "zebra"]
    assert data.num_classes == 3
    assert data.train.labels.tolist() == _expected_labels(data, data.train, dict(rows))


def test_integer_labels_are_class_indices(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"text": "good film", "label": 2}, {"text": "bad film", "label": 0}, {"text": "fine film", "label": 2},
            {"text": "sad and dull", "label": 0}]
    data = _load(tokenizer, _jsonl(tmp_path / "ints.jsonl", rows))
    # class 1 has no rows here, but it is a class: integer labels index the outputs
    assert data.class_names == ["0", "1", "2"]
    by_text = {row["text"]: str(row["label"]) for row in rows}
    assert data.train.labels.tolist() == _expected_labels(data, data.train, by_text)


def test_a_classifier_teachers_labels_fix_the_order(tokenizer: Any, tmp_path: Path) -> None:
    rows = sentences(40, seed=3)
    path = write_jsonl(tmp_path / "named.jsonl", rows)

    data = _load(tokenizer, path, teacher_labels=["positive", "negative"])

    assert data.class_names == ["positive", "negative"]  # not sorted: the teacher's output order
    assert data.train.labels.tolist() == _expected_labels(data, data.train, dict(rows))


def test_an_unknown_label_against_the_teachers_is_a_mismatch_naming_the_row(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}, "",
            {"text": "hmm", "label": "meh"}]
    with pytest.raises(MismatchError) as caught:
        _load(tokenizer, _jsonl(tmp_path / "meh.jsonl", rows), teacher_labels=["positive", "negative"])
    assert "row 4" in caught.value.message and "'meh'" in caught.value.message
    assert "teacher" in caught.value.message
    assert caught.value.field == "data.train"


def test_test_labels_outside_the_training_labels_are_a_mismatch(tokenizer: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [("good", "pos"), ("bad", "neg")])
    test = write_jsonl(tmp_path / "test.jsonl", [("good", "pos"), ("odd", "other")])
    # no teacher labels: the union is the label space, so a test-only class is a class of its own
    data = _load(tokenizer, train, test)
    assert data.class_names == ["neg", "other", "pos"]
    with pytest.raises(MismatchError) as caught:
        _load(tokenizer, train, test, teacher_labels=["pos", "neg"])
    assert caught.value.field == "data.test" and "row 2" in caught.value.message


def test_one_class_only_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [("good", "pos"), ("great", "pos")])
    with pytest.raises(BadInputError) as caught:
        _load(tokenizer, path)
    assert caught.value.field == "data.label_field"


def test_text_pairs_get_segment_ids(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"premise": f"the film was {a}", "hypothesis": f"it was {b}", "label": "same" if a == b else "diff"}
            for a in ("good", "bad", "dull") for b in ("good", "bad", "fun")]
    data = _load(tokenizer, _jsonl(tmp_path / "pairs.jsonl", rows), text_field="premise",
                 text_pair_field="hypothesis")

    split = data.train
    assert split.type_ids is not None
    sep = tokenizer.sep_token_id
    for index in range(len(split)):
        start, end = int(split.offsets[index]), int(split.offsets[index + 1])
        ids, types = split.tokens[start:end].tolist(), split.type_ids[start:end].tolist()
        first_sep = ids.index(sep)
        assert set(types[:first_sep + 1]) == {0}  # [CLS] premise [SEP]
        assert set(types[first_sep + 1:]) == {1}  # hypothesis [SEP]
        assert " [SEP] " in split.texts[index]
    batch = collate(split, torch.arange(len(split)), pad_id=tokenizer.pad_token_id)
    assert batch.token_type_ids is not None and int(batch.token_type_ids.sum()) > 0


def test_missing_pair_field_is_named(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"premise": "a", "hypothesis": "b", "label": 0}, {"premise": "c", "label": 1}]
    with pytest.raises(BadInputError) as caught:
        _load(tokenizer, _jsonl(tmp_path / "pairs.jsonl", rows), text_field="premise", text_pair_field="hypothesis")
    assert "row 2:" in caught.value.message and "'hypothesis'" in caught.value.message
    assert "text_pair_field" in caught.value.message


def test_truncation_to_max_length_is_counted(tokenizer: Any, tmp_path: Path) -> None:
    rows = sentences(120, seed=5)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:80])
    test = write_jsonl(tmp_path / "test.jsonl", rows[80:])
    max_length = 10
    expected = sum(len(tokenizer(text)["input_ids"]) > max_length for text, _ in rows)
    assert 0 < expected < len(rows)  # the data has both

    data = _load(tokenizer, train, test, max_length=max_length)

    assert data.info["truncated"] == expected
    assert data.train.truncated + data.test.truncated == expected
    assert int(data.train.lengths.max()) == max_length and int(data.test.lengths.max()) == max_length
    assert data.max_length == max_length


def test_splits_are_sorted_by_length_and_stratified(tokenizer: Any, tmp_path: Path) -> None:
    rows = sentences(200, seed=6)
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    data = _load(tokenizer, path, val_fraction=0.2)

    assert data.val is not None
    assert len(data.train) + len(data.val) == 200
    for split in (data.train, data.val):
        lengths = split.lengths.tolist()
        assert lengths == sorted(lengths)
        # the texts follow the sort: each one's own token count is its length
        assert [len(tokenizer(text)["input_ids"]) for text in split.texts] == lengths
    counts = Counter(label for _, label in rows)
    val_counts = Counter(data.class_names[i] for i in data.val.labels.tolist())
    for name, count in counts.items():
        assert val_counts[name] == round(count * 0.2)


# --- batching ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> TokenBatches:
    path = write_jsonl(tmp_path_factory.mktemp("batches") / "train.jsonl", sentences(301, seed=7))
    data = _load(tokenizer, path)
    return TokenBatches(data.train, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))


def _padding_fraction(lengths: torch.Tensor, order: list[torch.Tensor]) -> float:
    fractions = []
    for batch in order:
        chosen = lengths[batch]
        fractions.append(1.0 - float(chosen.sum()) / (len(chosen) * float(chosen.max())))
    return sum(fractions) / len(fractions)


@pytest.mark.parametrize("batch_size", [2, 8, 32])
def test_epoch_order_covers_every_example_once(batches: TokenBatches, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = batches.epoch_order(batch_size, generator)
        assert len(order) == batches.steps_per_epoch(batch_size) == -(-301 // batch_size)
        assert torch.cat(order).sort().values.tolist() == list(range(301))
        assert sorted(len(batch) for batch in order)[1:] == [batch_size] * (len(order) - 1)


def test_epoch_order_repeats_with_the_seed_and_changes_between_epochs(batches: TokenBatches) -> None:
    first = batches.epoch_order(8, torch.Generator().manual_seed(3))
    again_generator = torch.Generator().manual_seed(3)
    again = batches.epoch_order(8, again_generator)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    next_epoch = batches.epoch_order(8, again_generator)
    other_seed = batches.epoch_order(8, torch.Generator().manual_seed(4))
    assert [b.tolist() for b in next_epoch] != [b.tolist() for b in first]
    assert [b.tolist() for b in other_seed] != [b.tolist() for b in first]


@pytest.mark.parametrize("batch_size", [2, 8])
def test_batches_are_length_homogeneous(batches: TokenBatches, batch_size: int) -> None:
    lengths = batches.split.lengths
    assert int(lengths.max()) - int(lengths.min()) >= 6  # the data's lengths vary
    bucketed = batches.epoch_order(batch_size, torch.Generator().manual_seed(0))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
    random_order = list(shuffled.split(batch_size))
    assert _padding_fraction(lengths, bucketed) < 0.25 * _padding_fraction(lengths, random_order)


def test_batches_still_mix_the_data(batches: TokenBatches) -> None:
    # batches are shuffled after bucketing: the epoch does not run from short to long
    order = batches.epoch_order(8, torch.Generator().manual_seed(0))
    mean_lengths = [float(batches.split.lengths[batch].float().mean()) for batch in order]
    assert mean_lengths != sorted(mean_lengths)


def test_train_batch_pads_with_the_pad_id_and_masks_the_padding(batches: TokenBatches, tokenizer: Any) -> None:
    indices = torch.tensor([0, 150, 300])  # shortest, middle, longest
    batch, labels = batches.train_batch(indices, torch.Generator())
    lengths = batches.split.lengths[indices]
    assert batch.input_ids.shape == (3, int(lengths.max()))
    assert batch.attention_mask.sum(1).tolist() == lengths.tolist()
    for row, index in enumerate(indices.tolist()):
        expected = tokenizer(batches.split.texts[index])["input_ids"]
        width = len(expected)
        assert batch.input_ids[row, :width].tolist() == expected
        assert set(batch.input_ids[row, width:].tolist()) <= {tokenizer.pad_token_id}
    assert labels.tolist() == batches.split.labels[indices].tolist()


def test_eval_batches_cover_the_split_in_order(batches: TokenBatches) -> None:
    seen, labels = 0, []
    for batch, batch_labels in batches.eval_batches(64):
        assert batch.attention_mask.sum(1).tolist() == batches.split.lengths[seen:seen + len(batch)].tolist()
        seen += len(batch)
        labels += batch_labels.tolist()
    assert seen == 301 and labels == batches.split.labels.tolist()


def test_random_texts_are_tokenised_once_each(tokenizer: Any, tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["good", "bad", "film", "plot"]
    rows = [(" ".join(rng.choices(words, k=rng.randint(1, 6))) + f" {i}", "pos" if i % 2 else "neg")
            for i in range(50)]
    data = _load(tokenizer, write_jsonl(tmp_path / "t.jsonl", rows))
    assert sorted(data.train.texts) == sorted(text for text, _ in rows)
    assert int(data.train.offsets[-1]) == data.train.tokens.numel() == int(data.train.lengths.sum())
