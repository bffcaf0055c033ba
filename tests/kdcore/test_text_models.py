"""Text models: the hf teacher and students (layer copies), pretrained students, the BiLSTM, and their losses."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kdcore.architectures import HFArgs, TextBiLSTMArgs
from kdcore.errors import BadInputError, KDError, MismatchError, SpecError
from kdcore.hf_models import (
    TextClassifier,
    build_hf_student,
    build_text_bilstm,
    check_same_tokenizer,
    encoder_layers,
    evenly_spaced,
    load_pretrained_student,
    load_teacher_classifier,
    load_tokenizer,
    unpack_hf_zip,
)
from kdcore.losses import hidden_cosine_loss, kd_hidden_loss, kd_loss
from kdcore.text_data import TokenBatch
from tests.text_models import make_bert_folder, make_tokenizer, zip_folder

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return tmp_path_factory.mktemp("text_models")


@pytest.fixture(scope="module")
def teacher_zip(root: Path) -> Path:
    return zip_folder(make_bert_folder(root / "teacher4", layers=4, hidden=32, heads=2, seed=1), root / "t4.zip")


@pytest.fixture(scope="module")
def teacher_folder(root: Path, teacher_zip: Path):
    return unpack_hf_zip(teacher_zip, root / "unpacked4", field="teacher.file")


@pytest.fixture(scope="module")
def tokenizer(teacher_folder) -> Any:
    return load_tokenizer(teacher_folder, field="teacher.file")


@pytest.fixture
def teacher(teacher_folder) -> TextClassifier:
    return load_teacher_classifier(teacher_folder, CLASSES).eval()


def _batch(tokenizer: Any, texts: list[str]) -> TokenBatch:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return TokenBatch(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])


def _layer_state(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    _, layers = encoder_layers(model)
    return layers[index].state_dict()


# --- layer choice -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("teacher_layers", "student_layers", "expected"), [
    (6, 3, [1, 3, 5]), (12, 6, [1, 3, 5, 7, 9, 11]), (4, 2, [1, 3]), (12, 4, [2, 5, 8, 11]), (3, 3, [0, 1, 2]),
    (2, 1, [1]),
])
def test_evenly_spaced(teacher_layers: int, student_layers: int, expected: list[int]) -> None:
    assert evenly_spaced(teacher_layers, student_layers) == expected


# --- the teacher --------------------------------------------------------------------------------------------


def test_unpack_keeps_only_what_loads(root: Path, teacher_folder) -> None:
    source = root / "teacher4"
    path = zip_folder(source, root / "with_pickle.zip", top="model",
                      extra={"model/pytorch_model.bin": b"\x80\x04K\x01."})
    folder = unpack_hf_zip(path, root / "unpacked_pickle", field="teacher.file")
    names = sorted(p.name for p in folder.path.iterdir())
    assert names == sorted(p.name for p in source.iterdir())  # the top folder is stripped, the pickle skipped
    assert not (folder.path / "pytorch_model.bin").exists()
    assert (folder.path / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_base_teacher_gets_a_head_sized_to_the_data(teacher: TextClassifier, tokenizer: Any) -> None:
    logits = teacher(_batch(tokenizer, ["good film", "a bad and dull plot"]))
    assert logits.shape == (2, 2)
    assert teacher.model.config.id2label == {0: "negative", 1: "positive"}
    assert encoder_layers(teacher.model)[0] == "bert.encoder.layer"


def test_classifier_teacher_keeps_its_head(root: Path) -> None:
    folder_path = make_bert_folder(root / "clf3", layers=1, hidden=16, labels=["a", "b", "c"], seed=2)
    folder = unpack_hf_zip(zip_folder(folder_path, root / "clf3.zip"), root / "clf3_unpacked", field="teacher.file")
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(str(folder_path))
    model = load_teacher_classifier(folder, ["a", "b", "c"])
    assert torch.equal(model.model.classifier.weight, reference.classifier.weight)
    with pytest.raises(MismatchError) as caught:
        load_teacher_classifier(folder, ["a", "b"])
    assert caught.value.field == "data.label_field"


def test_capture_hidden_keeps_every_layer_and_the_mask(teacher: TextClassifier, tokenizer: Any) -> None:
    batch = _batch(tokenizer, ["good", "a bad and dull plot"])
    assert teacher(batch) is not None and teacher.hidden_states is None
    teacher.capture_hidden = True
    teacher(batch)
    assert teacher.hidden_states is not None and len(teacher.hidden_states) == 4 + 1
    assert teacher.hidden_states[-1].shape == (*batch.input_ids.shape, 32)
    assert teacher.attention_mask is not None and torch.equal(teacher.attention_mask, batch.attention_mask)


def test_teacher_logits_do_not_depend_on_padding(teacher: TextClassifier, tokenizer: Any) -> None:
    with torch.no_grad():
        alone = teacher(_batch(tokenizer, ["good film"]))
        padded = teacher(_batch(tokenizer, ["good film", "the story was really very dull and the plot was bad"]))
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


# --- hf students ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_layers", [
    None, [0, 3], [3, 1],
    pytest.param([2, 2], id="one-teacher-layer-twice"),
])
def test_student_copies_embeddings_head_and_chosen_layers(teacher: TextClassifier,
                                                          teacher_layers: list[int] | None) -> None:
    plan = build_hf_student(teacher, HFArgs(num_hidden_layers=2), seed=0, init_from_teacher=True,
                            teacher_layers=teacher_layers)
    student = plan.model
    assert isinstance(student, TextClassifier)
    chosen = teacher_layers or [1, 3]
    assert plan.teacher_layers == chosen
    assert len(encoder_layers(student.model)[1]) == 2
    for student_index, teacher_index in enumerate(chosen):
        student_layer, teacher_layer = _layer_state(student.model, student_index), _layer_state(teacher.model,
                                                                                                  teacher_index)
        assert student_layer.keys() == teacher_layer.keys()
        for name, tensor in teacher_layer.items():
            assert torch.equal(student_layer[name], tensor), (student_index, teacher_index, name)
    teacher_state, student_state = teacher.model.state_dict(), student.model.state_dict()
    for name in [n for n in student_state if not n.startswith("bert.encoder.")]:
        assert torch.equal(student_state[name], teacher_state[name]), name  # embeddings, pooler, classifier
    # same width: every student tensor came from the teacher
    assert plan.shared_parameters == sum(p.numel() for p in student.model.parameters())
    assert plan.shared_parameters < sum(p.numel() for p in teacher.model.parameters())


def test_student_copy_leaves_the_teacher_alone(teacher: TextClassifier) -> None:
    before = {name: tensor.clone() for name, tensor in teacher.model.state_dict().items()}
    plan = build_hf_student(teacher, HFArgs(num_hidden_layers=1), seed=0, init_from_teacher=True, teacher_layers=None)
    with torch.no_grad():
        for parameter in plan.model.parameters():
            parameter.add_(1.0)
    for name, tensor in teacher.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} is shared with the student, not copied"


def test_student_without_init_is_random_and_seeded(teacher: TextClassifier) -> None:
    def build(seed: int):
        return build_hf_student(teacher, HFArgs(num_hidden_layers=2), seed=seed, init_from_teacher=False,
                                teacher_layers=None)

    first, again, other = build(0), build(0), build(1)
    assert first.shared_parameters == 0
    name = "bert.encoder.layer.0.attention.self.query.weight"
    teacher_tensor = teacher.model.state_dict()["bert.encoder.layer.1.attention.self.query.weight"]
    assert not torch.equal(first.model.model.state_dict()[name], teacher_tensor)
    assert torch.equal(first.model.model.state_dict()[name], again.model.model.state_dict()[name])
    assert not torch.equal(first.model.model.state_dict()[name], other.model.model.state_dict()[name])


def test_narrower_student_shares_what_fits_only(teacher: TextClassifier, tokenizer: Any) -> None:
    plan = build_hf_student(teacher, HFArgs(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                            intermediate_size=32), seed=0, init_from_teacher=True,
                            teacher_layers=None)
    student: Any = plan.model
    assert student.model.config.hidden_size == 16
    teacher_shapes = {name: tensor.shape for name, tensor in teacher.model.state_dict().items()}
    student_state = student.model.state_dict()
    expected = sum(tensor.numel() for name, tensor in student_state.items()
                   if _teacher_name(name) in teacher_shapes and teacher_shapes[_teacher_name(name)] == tensor.shape)
    assert plan.shared_parameters == expected
    assert plan.model(_batch(tokenizer, ["good film"])).shape == (1, 2)


def _teacher_name(student_name: str) -> str:
    """The teacher tensor a 2-layer student's tensor comes from, with the default layers [1, 3]."""
    for student_index, teacher_index in enumerate([1, 3]):
        prefix = f"bert.encoder.layer.{student_index}."
        if student_name.startswith(prefix):
            return f"bert.encoder.layer.{teacher_index}." + student_name.removeprefix(prefix)
    return student_name


@pytest.mark.parametrize(("layers", "words"), [([1], "1 teacher layers"), ([0, 1, 2], "3 teacher layers"),
                                               ([0, 4], "layer 4 does not exist")])
def test_bad_teacher_layers_name_the_field(teacher: TextClassifier, layers: list[int], words: str) -> None:
    with pytest.raises(KDError) as caught:
        build_hf_student(teacher, HFArgs(num_hidden_layers=2), seed=0, init_from_teacher=True, teacher_layers=layers)
    assert caught.value.field == "student.teacher_layers"
    assert words in caught.value.message


def test_heads_that_do_not_divide_the_width_are_refused(teacher: TextClassifier) -> None:
    # the width is the teacher's (32): only the engine can tell
    with pytest.raises(KDError) as caught:
        build_hf_student(teacher, HFArgs(num_hidden_layers=1, num_attention_heads=3), seed=0, init_from_teacher=True,
                         teacher_layers=None)
    assert caught.value.field == "student.arch_args" and "3 heads" in caught.value.message
    # both given: the spec itself is refused
    from kdcore.spec import parse_spec

    with pytest.raises(SpecError) as spec_error:
        parse_spec({"teacher": {"file": "t.zip"}, "data": {"train": "d.jsonl"},
                    "student": {"arch": "hf", "arch_args": {"hidden_size": 30, "num_attention_heads": 4}}})
    assert spec_error.value.field == "student.arch_args"


# --- pretrained students ----------------------------------------------------------------------------------------


def _student_folder(root: Path, name: str, *, corpus: list[str] | None, tokenizer_from: Path | None = None) -> Path:
    """A 1-layer BERT with the tokenizer of `tokenizer_from`, or one trained on `corpus`.

    (Two WordPiece trainings on one corpus may order tied tokens differently: the same tokenizer is a copy.)
    """
    import shutil

    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / file, folder / file)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        tokenizer = make_tokenizer(folder, corpus=corpus)
    torch.manual_seed(5)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_pretrained_student_with_the_same_tokenizer_loads(root: Path, tokenizer: Any) -> None:
    source = _student_folder(root, "same_tok", corpus=None, tokenizer_from=root / "teacher4")
    folder = unpack_hf_zip(zip_folder(source, root / "same.zip"),
                           root / "same_unpacked", field="student.file")
    plan = load_pretrained_student(folder, tokenizer, CLASSES)
    assert isinstance(plan.model, TextClassifier)
    assert plan.model.model.config.num_labels == 2 and plan.shared_parameters == 0
    assert "1 layers x 16" in plan.description
    assert plan.model(_batch(tokenizer, ["good film", "bad"])).shape == (2, 2)


def test_pretrained_student_with_another_tokenizer_is_refused(root: Path, tokenizer: Any) -> None:
    corpus = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"] * 20
    folder = unpack_hf_zip(zip_folder(_student_folder(root, "other_tok", corpus=corpus), root / "other.zip"),
                           root / "other_unpacked", field="student.file")
    student_vocab = load_tokenizer(folder, field="student.file").get_vocab()
    teacher_vocab = tokenizer.get_vocab()
    differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])
    assert differing

    with pytest.raises(MismatchError) as caught:
        load_pretrained_student(folder, tokenizer, CLASSES)

    message = caught.value.message
    assert caught.value.field == "student.file"
    assert f"{len(teacher_vocab)} against {len(student_vocab)} tokens" in message
    token, index = differing[0]
    assert f"{token!r} (id {index})" in message


def test_same_size_vocabularies_that_differ_are_told_apart(tokenizer: Any) -> None:
    class Renamed:
        def get_vocab(self) -> dict[str, int]:
            vocab = dict(tokenizer.get_vocab())
            token = next(name for name, index in vocab.items() if index == 100)
            vocab["zzz-renamed"] = vocab.pop(token)
            return vocab

    with pytest.raises(MismatchError) as caught:
        check_same_tokenizer(tokenizer, Renamed(), field="student.file")
    assert "'zzz-renamed' (id 100)" in caught.value.message
    check_same_tokenizer(tokenizer, tokenizer, field="student.file")  # the same one passes


def test_pretrained_student_zip_with_code_is_refused(root: Path) -> None:
    path = zip_folder(_student_folder(root, "code_student", corpus=None), root / "code_student.zip",
                      extra={"modeling_evil.py": b"import os\n"})
    with pytest.raises(BadInputError) as caught:
        unpack_hf_zip(path, root / "code_student_unpacked", field="student.file")
    assert caught.value.field == "student.file" and "modeling_evil.py" in caught.value.message
    assert not (root / "code_student_unpacked" / "modeling_evil.py").exists()


def test_not_a_zip_is_a_bad_input(root: Path) -> None:
    path = root / "not.zip"
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(BadInputError) as caught:
        unpack_hf_zip(path, root / "not_unpacked", field="student.file")
    assert caught.value.field == "student.file"
    assert zipfile.is_zipfile(path) is False


# --- the BiLSTM student ----------------------------------------------------------------------------------------


def test_text_bilstm_starts_from_the_teachers_embeddings(teacher: TextClassifier) -> None:
    plan = build_text_bilstm(teacher, TextBiLSTMArgs(hidden=8, mlp_hidden=12), num_classes=2, pad_id=0, seed=0)
    embeddings: Any = teacher.model.get_input_embeddings().weight
    model: Any = plan.model
    assert torch.equal(model.embed.weight, embeddings)
    assert plan.shared_parameters == embeddings.numel()
    assert model.embed.weight.data_ptr() != embeddings.data_ptr()
    frozen: Any = build_text_bilstm(teacher, TextBiLSTMArgs(hidden=8, freeze_embeddings=True), num_classes=2,
                                    pad_id=0, seed=0).model
    assert frozen.embed.weight.requires_grad is False and model.embed.weight.requires_grad is True


@pytest.mark.parametrize("layers", [1, 2])
def test_text_bilstm_output_does_not_depend_on_padding(teacher: TextClassifier, tokenizer: Any, layers: int) -> None:
    plan = build_text_bilstm(teacher, TextBiLSTMArgs(hidden=8, mlp_hidden=12, layers=layers, dropout=0.3),
                             num_classes=2, pad_id=tokenizer.pad_token_id, seed=0)
    model = plan.model.eval()
    short, long = "good film", "the story was really very dull and the plot was bad"
    with torch.no_grad():
        alone = model(_batch(tokenizer, [short]))
        padded = model(_batch(tokenizer, [long, short]))
        long_alone = model(_batch(tokenizer, [long]))
    assert padded.shape == (2, 2)
    both = _batch(tokenizer, [long, short])
    assert int(both.attention_mask[1].sum()) < both.input_ids.shape[1]  # the short one is padded
    torch.testing.assert_close(padded[1], alone[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(padded[0], long_alone[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(alone[0], long_alone[0])  # it does read the tokens


def test_text_bilstm_padding_is_ignored_even_where_pad_ids_are_not_zero(teacher: TextClassifier,
                                                                        tokenizer: Any) -> None:
    # only the mask says what is padding: garbage in the padded positions changes nothing
    plan = build_text_bilstm(teacher, TextBiLSTMArgs(hidden=8, mlp_hidden=0), num_classes=2,
                             pad_id=tokenizer.pad_token_id, seed=0)
    model = plan.model.eval()
    batch = _batch(tokenizer, ["the story was really very dull and the plot was bad", "good film"])
    noisy = batch.input_ids.clone()
    noisy[batch.attention_mask == 0] = 7
    with torch.no_grad():
        clean_logits = model(batch)
        noisy_logits = model(TokenBatch(noisy, batch.attention_mask, batch.token_type_ids))
    torch.testing.assert_close(noisy_logits, clean_logits, atol=1e-6, rtol=1e-6)


# --- losses --------------------------------------------------------------------------------------------------


def _hand_cosine_loss(students: list[torch.Tensor], teachers: list[torch.Tensor], mask: torch.Tensor) -> float:
    per_pair = []
    for student, teacher in zip(students, teachers, strict=True):
        total, count = 0.0, 0
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if mask[b, t]:
                    s, h = student[b, t].tolist(), teacher[b, t].tolist()
                    dot = sum(x * y for x, y in zip(s, h, strict=True))
                    norms = sum(x * x for x in s) ** 0.5 * sum(y * y for y in h) ** 0.5
                    total += 1.0 - dot / norms
                    count += 1
        per_pair.append(total / count)
    return sum(per_pair) / len(per_pair)


def test_hidden_cosine_loss_by_hand_ignores_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    students = [torch.randn(2, 4, 3, generator=generator) for _ in range(2)]
    teachers = [torch.randn(2, 4, 3, generator=generator) for _ in range(2)]

    loss = hidden_cosine_loss(students, teachers, mask)

    assert float(loss) == pytest.approx(_hand_cosine_loss(students, teachers, mask), abs=1e-6)
    # anything at all in the padded positions changes nothing
    scrambled = [s.clone() for s in students]
    for s in scrambled:
        s[mask == 0] = torch.randn(int((mask == 0).sum()), 3, generator=generator) * 100
    assert float(hidden_cosine_loss(scrambled, teachers, mask)) == pytest.approx(float(loss), abs=1e-6)


def test_hidden_cosine_loss_values() -> None:
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    mask = torch.ones(1, 2)
    assert float(hidden_cosine_loss([teacher * 3], [teacher], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_cosine_loss([-teacher], [teacher], mask)) == pytest.approx(2.0, abs=1e-6)
    orthogonal = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert float(hidden_cosine_loss([orthogonal], [teacher], mask)) == pytest.approx(1.0, abs=1e-6)
    # one aligned pair and one opposite pair: the mean over pairs
    assert float(hidden_cosine_loss([teacher, -teacher], [teacher, teacher], mask)) == pytest.approx(1.0, abs=1e-6)


def test_hidden_cosine_loss_has_gradients_only_on_real_tokens() -> None:
    student = torch.randn(1, 3, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4)
    hidden_cosine_loss([student], [teacher], torch.tensor([[1, 1, 0]])).backward()
    assert student.grad is not None
    assert float(student.grad[0, 2].abs().sum()) == 0.0 and float(student.grad[0, :2].abs().sum()) > 0


@pytest.mark.parametrize(("alpha", "weight"), [(0.9, 1.0), (0.5, 0.25), (1.0, 3.0), (0.7, 0.0)])
def test_kd_hidden_loss_is_kd_plus_the_weighted_hidden_term(alpha: float, weight: float) -> None:
    generator = torch.Generator().manual_seed(1)
    logits, teacher_logits = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    labels = torch.tensor([0, 2])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    students = [torch.randn(2, 3, 4, generator=generator)]
    teachers = [torch.randn(2, 3, 4, generator=generator)]

    total = kd_hidden_loss(logits, teacher_logits, labels, student_hidden=students, teacher_hidden=teachers, mask=mask,
                           temperature=2.0, alpha=alpha, hidden_weight=weight)

    soft = F.kl_div(F.log_softmax(logits / 2.0, -1), F.softmax(teacher_logits / 2.0, -1), reduction="batchmean") * 4
    hard = F.cross_entropy(logits, labels)
    expected_kd = soft if alpha >= 1.0 else alpha * soft + (1 - alpha) * hard
    assert float(kd_loss(logits, teacher_logits, labels, temperature=2.0, alpha=alpha)) == pytest.approx(
        float(expected_kd), abs=1e-6)
    expected = float(expected_kd) + weight * _hand_cosine_loss(students, teachers, mask)
    assert float(total) == pytest.approx(expected, abs=1e-5)
