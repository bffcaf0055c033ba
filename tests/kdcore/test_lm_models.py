"""Causal LM models: the head split, padded vocabularies, students from the teacher, tokenizers, generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kdcore.architectures import HFArgs
from kdcore.errors import MismatchError
from kdcore.hf_models import load_config, load_tokenizer, unpack_hf_zip
from kdcore.lm_data import LMBatch
from kdcore.lm_models import (
    CausalLM,
    build_lm_student,
    generate,
    load_causal_lm,
    load_pretrained_lm_student,
    planned_student,
)
from kdcore.spec import parse_spec
from kdcore.tasks import resolve_task
from kdcore.teacher_sniff import sniff_teacher
from tests.lm_models import make_lm_zip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm_models")


def _load(root: Path, name: str, **kwargs: Any) -> tuple[CausalLM, Any, Any]:
    path = root / f"{name}.zip"
    if not path.exists():
        make_lm_zip(root, name, **kwargs)
    folder = unpack_hf_zip(path, root / f"{name}_unpacked", field="teacher.file")
    tokenizer = load_tokenizer(folder, field="teacher.file")
    return load_causal_lm(folder, tokenizer, field="teacher.file"), tokenizer, folder


def _batch(tokenizer: Any, texts: list[str]) -> LMBatch:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return LMBatch(encoded["input_ids"], encoded["attention_mask"], encoded["input_ids"].clone())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_zip_sniffs_as_causal_lm_and_resolves(root: Path, family: str) -> None:
    make_lm_zip(root, f"sniff_{family}", family=family)
    info = sniff_teacher(root / f"sniff_{family}.zip")
    assert info.hf is not None and info.hf.task == "causal_lm"
    spec = parse_spec({"teacher": {"file": "t.zip"}, "data": {"train": "d.jsonl"}})
    assert resolve_task(spec, info) == "causal_lm"
    wrong = parse_spec({"task": "text_classification", "teacher": {"file": "t.zip"}, "data": {"train": "d.jsonl"}})
    with pytest.raises(Exception, match="task is text_classification"):
        resolve_task(wrong, info)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_states_and_head_give_the_models_own_logits(root: Path, family: str) -> None:
    model, tokenizer, _ = _load(root, family, family=family)
    batch = _batch(tokenizer, ["the cat sees", "a dog"])
    with torch.no_grad():
        own = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        split = model(batch)
    assert torch.allclose(own, split, atol=1e-5)


def test_padded_teacher_vocabulary_is_sliced_to_the_tokenizer(root: Path) -> None:
    teacher, tokenizer, folder = _load(root, "padded", family="llama", vocab_padding=24)
    rows = teacher.model.get_output_embeddings().weight.shape[0]
    assert rows == len(tokenizer) + 24 and teacher.vocab == len(tokenizer)
    logits = teacher(_batch(tokenizer, ["the cat"]))
    assert logits.shape[-1] == len(tokenizer)
    # A student of another padding (as Qwen2.5 0.5B against 7B) is compared on the same real vocabulary.
    config = load_config(folder, field="teacher.file")
    config.vocab_size = len(tokenizer) + 8
    plan = build_lm_student(config, HFArgs(num_hidden_layers=1), vocab=teacher.vocab, seed=0, teacher=None,
                            teacher_layers=None)
    assert plan.model.model.get_output_embeddings().weight.shape[0] == len(tokenizer) + 8
    assert plan.model(_batch(tokenizer, ["the cat"])).shape[-1] == logits.shape[-1]
    # Padded rows are never generated, even when they would win.
    with torch.no_grad():
        teacher.model.get_output_embeddings().weight[len(tokenizer):] = 100.0
    answers = generate(teacher, [tokenizer("the cat")["input_ids"]], max_new_tokens=5, sample=False,
                       tokenizer=tokenizer)
    assert answers[0] and max(answers[0]) < len(tokenizer)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_student_copies_teacher_layers_and_counts_match_the_plan(root: Path, family: str) -> None:
    teacher, _, folder = _load(root, f"deep_{family}", family=family, layers=4)
    config = load_config(folder, field="teacher.file")
    args = HFArgs(num_hidden_layers=2)
    plan = build_lm_student(config, args, vocab=teacher.vocab, seed=0, teacher=teacher.model, teacher_layers=[0, 3])
    student = plan.model.model
    assert plan.teacher_layers == [0, 3] and plan.shared_parameters > 0
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    teacher_state, student_state = teacher.model.state_dict(), student.state_dict()
    for name, tensor in student_state.items():
        if name.startswith(f"{prefix}.1."):
            assert torch.equal(tensor, teacher_state[name.replace(f"{prefix}.1.", f"{prefix}.3.")])
    _, planned = planned_student(config, args, [0, 3])
    assert planned == sum(p.numel() for p in student.parameters())


def test_narrower_llama_student_keeps_its_config_consistent(root: Path) -> None:
    teacher, tokenizer, folder = _load(root, "llama", family="llama")
    config = load_config(folder, field="teacher.file")
    plan = build_lm_student(config, HFArgs(num_hidden_layers=1, hidden_size=16, num_attention_heads=4,
                                           intermediate_size=32),
                            vocab=teacher.vocab, seed=0, teacher=teacher.model, teacher_layers=None)
    student_config = plan.model.model.config
    assert student_config.head_dim == 4 and student_config.num_attention_heads % student_config.num_key_value_heads == 0
    assert plan.model(_batch(tokenizer, ["the cat"])).shape[-1] == teacher.vocab


def test_pretrained_student_with_another_tokenizer_is_refused_naming_tokens(root: Path) -> None:
    _, tokenizer, _ = _load(root, "gpt2", family="gpt2")
    make_lm_zip(root, "other_tok", family="gpt2", tokenizer_corpus=["zebra yak xylophone quokka"] * 50)
    folder = unpack_hf_zip(root / "other_tok.zip", root / "other_unpacked", field="student.file")
    other = load_tokenizer(folder, field="student.file")
    teacher_tokens = {i: t for t, i in tokenizer.get_vocab().items()}
    student_tokens = {i: t for t, i in other.get_vocab().items()}
    first = min(i for i in teacher_tokens if teacher_tokens[i] != student_tokens.get(i))
    with pytest.raises(MismatchError) as caught:
        load_pretrained_lm_student(folder, tokenizer)
    assert caught.value.field == "student.file"
    assert (f"id {first} is {teacher_tokens[first]!r} for the teacher, {student_tokens.get(first)!r} for the student"
            in caught.value.message)


def test_pretrained_student_of_the_same_tokenizer_loads(root: Path) -> None:
    _, tokenizer, _ = _load(root, "gpt2", family="gpt2")
    make_lm_zip(root, "small_student", family="gpt2", layers=1, hidden=16)
    folder = unpack_hf_zip(root / "small_student.zip", root / "small_unpacked", field="student.file")
    plan = load_pretrained_lm_student(folder, tokenizer)
    assert "1 layers x 16" in plan.description


def test_the_sniffers_decoder_families_are_causal_lms_in_transformers() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from kdcore.hf_sniff import _DECODER_TYPES

    assert set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) >= _DECODER_TYPES
