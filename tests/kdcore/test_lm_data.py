"""LM data: packing, completion and chat-template masks, shifted labels, bad rows named, the spec's LM fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdcore.errors import BadInputError, SpecError
from kdcore.lm_data import IGNORE, collate_lm, load_lm_data
from kdcore.spec import DataSpec, for_task, parse_spec
from tests.lm_models import EOS, make_bpe_tokenizer, sentences, write_chat_jsonl, write_completion_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tok = make_bpe_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.pad_token = EOS
    return tok


def _data(path: Path, tokenizer: Any, *, seq_kd: bool = False, **data: Any) -> Any:
    spec = DataSpec(train=str(path), **data)
    return load_lm_data(spec, train_path=path, test_path=None, tokenizer=tokenizer, seed=0, seq_kd=seq_kd)


def _targets(split: Any, index: int, tokenizer: Any) -> str:
    ids = split.sequence(index)
    flags = split.targets[int(split.offsets[index]):int(split.offsets[index + 1])].tolist()
    return str(tokenizer.decode([t for t, f in zip(ids, flags, strict=True) if f]))


def test_text_is_packed_into_blocks_with_eos_between_documents(tmp_path: Path, tokenizer: Any) -> None:
    texts = sentences(40, seed=0)
    path = tmp_path / "lm.txt"
    path.write_text("\n".join(texts))
    data = _data(path, tokenizer, max_length=16, val_fraction=0.0)
    assert data.kind == "text"
    assert (data.train.lengths[:-1] == 16).all() and int(data.train.lengths[-1]) <= 16
    stream = tokenizer("\n".join(texts))["input_ids"] + [tokenizer.eos_token_id]
    assert data.train.tokens.tolist() == stream[:len(data.train.tokens)]
    assert data.train.tokens.dtype == torch.int32


def test_jsonl_documents_are_separated_by_eos(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": "a dog"}\n')
    data = _data(path, tokenizer, max_length=64, val_fraction=0.0)
    ids = data.train.sequence(0)
    eos = tokenizer.eos_token_id
    assert ids == tokenizer("the cat")["input_ids"] + [eos] + tokenizer("a dog")["input_ids"] + [eos]


def test_labels_are_shifted_next_tokens_with_ignored_prompt_and_padding(tmp_path: Path, tokenizer: Any) -> None:
    path = write_completion_jsonl(tmp_path / "pc.jsonl", ["the cat sees the fish today.", "a dog eats bread."])
    data = _data(path, tokenizer, val_fraction=0.0)
    batch = collate_lm(data.train, torch.tensor([0, 1]), pad_id=tokenizer.pad_token_id)
    for row in range(2):
        ids = data.train.sequence(row)
        prompt = int(data.train.prompt_lengths[row])
        labels = batch.labels[row].tolist()
        # Position t predicts token t+1: ignored while t+1 is still the prompt.
        assert labels[:prompt - 1] == [IGNORE] * (prompt - 1)
        assert labels[prompt - 1:len(ids) - 1] == ids[prompt:]
        assert labels[len(ids) - 1:] == [IGNORE] * (len(labels) - len(ids) + 1)
    assert _targets(data.train, 0, tokenizer) == " sees the fish today." + EOS


def test_chat_template_masks_everything_but_the_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sees the fish"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "today."}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    data = _data(path, tokenizer, val_fraction=0.0)
    assert data.kind == "chat"
    rendered = tokenizer.decode(data.train.sequence(0))
    assert rendered.startswith("<|system|>be brief<|end|><|user|>the cat<|end|><|assistant|>sees the fish")
    assert _targets(data.train, 0, tokenizer) == "sees the fish<|end|>today.<|end|>"


def test_chat_rows_without_a_chat_template_are_a_clear_error(tmp_path: Path) -> None:
    plain = make_bpe_tokenizer(tmp_path / "plain", chat_template=False)
    path = write_chat_jsonl(tmp_path / "chat.jsonl", sentences(3, seed=0))
    with pytest.raises(BadInputError, match="no chat template") as caught:
        _data(path, plain)
    assert caught.value.field == "data.train"


@pytest.mark.parametrize(("rows", "words"), [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}], "row 2: 'completion' is empty"),
    ([{"text": "a"}, {"text": 3}], "row 2: 'text' is not text"),
    ([{"text": "a"}, {"prompt": "x", "completion": "y"}], "row 2: is a prompt with its completion but the first"),
    ([{"body": "a"}], "row 1: none of 'text'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: 'messages' has no assistant turn"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], "row 1: 'messages'[0] is not"),
])
def test_bad_rows_are_named_by_number_and_field(tmp_path: Path, tokenizer: Any, rows: list[dict[str, Any]],
                                                words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(BadInputError) as caught:
        _data(path, tokenizer)
    assert words in caught.value.message and caught.value.field == "data.train"


def test_prompt_only_rows_are_for_seq_kd_only(tmp_path: Path, tokenizer: Any) -> None:
    path = write_completion_jsonl(tmp_path / "p.jsonl", sentences(6, seed=0), with_completion=False)
    with pytest.raises(BadInputError, match="seq_kd"):
        _data(path, tokenizer)
    data = _data(path, tokenizer, seq_kd=True, val_fraction=0.0)
    assert data.kind == "prompt" and int(data.train.label_counts().sum()) == 0


def test_validation_split_is_seeded(tmp_path: Path, tokenizer: Any) -> None:
    path = write_completion_jsonl(tmp_path / "pc.jsonl", sentences(50, seed=0))
    first, second = _data(path, tokenizer, val_fraction=0.2), _data(path, tokenizer, val_fraction=0.2)
    assert len(first.val) == 10 and len(first.train) == 40
    assert torch.equal(first.val.tokens, second.val.tokens)


# --- the spec's causal_lm fields ---------------------------------------------------------------------------

BASE = {"teacher": {"file": "t.zip"}, "data": {"train": "d.jsonl"}}


def _resolved(**patch: Any) -> Any:
    return for_task(parse_spec({**BASE, **patch}), "causal_lm")


def test_causal_lm_defaults() -> None:
    spec = _resolved()
    assert spec.task == "causal_lm" and spec.student.arch == "hf" and spec.student.init_from_teacher
    assert spec.export == ["hf", "safetensors"] and spec.data.max_length == 256
    assert spec.method.divergence == "forward_kl" and spec.method.top_k == 0 and spec.method.temperature == 1.0
    assert spec.optim.lr == 5e-4


@pytest.mark.parametrize(("patch", "field"), [
    ({"method": {"name": "kd_hidden"}}, "method.name"),
    ({"data": {"train": "d.jsonl", "label_field": "y"}}, "data.label_field"),
    ({"data": {"train": "d.jsonl", "augment": "flip_crop"}}, "data.augment"),
    ({"export": ["hf", "torchscript"]}, "export"),
    ({"export": ["onnx"]}, "export"),
    ({"student": {"arch": "text_bilstm"}}, "student.arch"),
    ({"method": {"name": "seq_kd", "top_k": 8}}, "method.top_k"),
    ({"precision": "fp16"}, "precision"),
    ({"quantize": "dynamic_int8"}, "quantize"),
])
def test_other_tasks_fields_are_refused_by_name(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        _resolved(**patch)
    assert field in [error["field"] for error in caught.value.errors]


@pytest.mark.parametrize(("patch", "field"), [
    ({"method": {"divergence": "jsd"}}, "method.divergence"),
    ({"method": {"top_k": 4}}, "method.top_k"),
    ({"method": {"name": "seq_kd"}}, "method.name"),
    ({"data": {"train": "d.jsonl", "prompt_field": "q"}}, "data.prompt_field"),
])
def test_lm_fields_are_refused_for_text_classification(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        for_task(parse_spec({**BASE, **patch}), "text_classification")
    assert field in [error["field"] for error in caught.value.errors]


def test_lm_method_values_are_checked() -> None:
    for patch, field in (({"divergence": "l2"}, "method.divergence"), ({"beta": 1.5}, "method.beta"),
                         ({"top_k": -1}, "method.top_k"), ({"sampling": "beam"}, "method.sampling")):
        with pytest.raises(SpecError) as caught:
            parse_spec({**BASE, "method": patch})
        assert caught.value.errors[0]["field"] == field


def test_epoch_order_covers_every_sequence_once_in_length_buckets(tmp_path: Path, tokenizer: Any) -> None:
    from kdcore.lm_data import LMBatches

    path = write_completion_jsonl(tmp_path / "pc.jsonl", sentences(60, seed=5))
    data = _data(path, tokenizer, val_fraction=0.0)
    batches = LMBatches(data.train, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    order = batches.epoch_order(8, torch.Generator().manual_seed(0))
    assert len(order) == batches.steps_per_epoch(8)
    assert sorted(torch.cat(order).tolist()) == list(range(60))
    assert [b.tolist() for b in order] == [b.tolist() for b in batches.epoch_order(8, torch.Generator().manual_seed(0))]
