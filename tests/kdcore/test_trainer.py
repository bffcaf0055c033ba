import pytest
import torch
from torch import nn

from kdcore.callbacks import Callbacks
from kdcore.checkpoint import Checkpointer, RunState
from kdcore.errors import TrainingDivergedError
from kdcore.losses import build_distill_loss, cross_entropy_loss
from kdcore.mixup import Mixup
from kdcore.models import build_model
from kdcore.runtime import Runtime
from kdcore.sharing import share_parameters
from kdcore.spec import MethodSpec, OptimSpec
from kdcore.teacher_cache import LiveTeacher, TeacherLogitsCache
from kdcore.trainer import DeviceData, ProgressTracker, Stage, Trainer, steps_per_epoch

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


def _data(n: int = 96) -> DeviceData:
    generator = torch.Generator().manual_seed(0)
    return DeviceData(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=generator),
                      torch.randint(0, 3, (n,), generator=generator))


def _trainer(data: DeviceData, *, augment=None, checkpointer=None, mixup=None) -> Trainer:
    return Trainer(runtime=CPU, optim=OptimSpec(lr=1e-2), train=data, val=None,
                   preprocess=_Scale(), augment=augment, batch_size=16, eval_batch_size=64, seed=0,
                   callbacks=Callbacks(), checkpointer=checkpointer, tracker=ProgressTracker(total_steps=100),
                   mixup=mixup)


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


class CountingTeacher(nn.Module):
    """A BatchNorm teacher that counts how many samples it was run on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("cnn", {"widths": [4], "hidden": 0}, (1, 8, 8), 3)
        self.samples_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples_seen += len(x)
        return self.net(x)


def test_teacher_batchnorm_statistics_do_not_move_during_distillation() -> None:
    data = _data()
    teacher = CountingTeacher()
    teacher.train()  # the live teacher must put it in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)

    _trainer(data).fit(Stage("distill", "student", 2, 1e-2, 1), student,
                       build_distill_loss(MethodSpec()), RunState(), teacher_targets=LiveTeacher(teacher, CPU))

    after = teacher.state_dict()
    assert not teacher.training
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher buffers or weights changed"
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_cache_runs_the_teacher_once() -> None:
    data = _data()
    teacher = CountingTeacher().eval()
    cache = TeacherLogitsCache.compute(teacher, data.x, preprocess=_Scale(), runtime=CPU, batch_size=32)
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)

    _trainer(data).fit(Stage("distill", "student", 3, 1e-2, 1), student,
                       build_distill_loss(MethodSpec()), RunState(), teacher_targets=cache)

    assert teacher.samples_seen == len(data)
    assert cache.logits.dtype == torch.float16
    with torch.no_grad():
        exact = teacher(data.x.float() / 255)
    assert torch.allclose(cache(torch.arange(len(data)), data.x.float()), exact, atol=1e-2)


def test_live_teacher_runs_every_step_with_augmentation() -> None:
    data = _data()
    teacher = CountingTeacher()
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
    flip = lambda x, g: x.flip(-1)  # noqa: E731
    _trainer(data, augment=flip).fit(Stage("distill", "student", 2, 1e-2, 1), student,
                                     build_distill_loss(MethodSpec()), RunState(),
                                     teacher_targets=LiveTeacher(teacher, CPU))
    assert teacher.samples_seen == 2 * steps_per_epoch(len(data), 16) * 16


def test_nan_loss_stops_the_run_with_a_clear_error() -> None:
    def nan_loss(logits: torch.Tensor, teacher: object, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(logits, None, labels) * float("nan")

    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
    with pytest.raises(TrainingDivergedError, match="loss became nan"):
        _trainer(_data()).fit(Stage("finetune", "student", 1, 1e-2, 2), student, nan_loss, RunState())


def test_checkpoint_written_every_epoch_and_loads_strictly(tmp_path) -> None:
    checkpointer = Checkpointer(tmp_path)
    state = RunState()
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
    _trainer(_data(), checkpointer=checkpointer).fit(Stage("finetune", "student", 2, 1e-2, 2), student,
                                                     cross_entropy_loss, state)
    loaded = checkpointer.load()
    assert loaded is not None
    assert (loaded.stage, loaded.epoch) == ("finetune", 2)
    assert torch.equal(loaded.models["student"]["3.weight"], student.state_dict()["3.weight"])
    assert loaded.optimizer is not None and loaded.scheduler is not None and loaded.rng is not None
    assert len(loaded.history) == 2


def test_share_parameters_copies_matching_tensors_only() -> None:
    teacher = build_model("mlp", {"hidden": [8, 8]}, (1, 4, 4), 3)
    student = build_model("mlp", {"hidden": [8, 4]}, (1, 4, 4), 3)
    shared = share_parameters(teacher, student)
    # 1.weight, 1.bias and the output bias 5.bias match by name and shape; layer 3 and 5.weight do not.
    assert shared == 3
    assert torch.equal(student.state_dict()["1.weight"], teacher.state_dict()["1.weight"])
    assert torch.equal(student.state_dict()["5.bias"], teacher.state_dict()["5.bias"])
    assert not torch.equal(student.state_dict()["3.bias"], teacher.state_dict()["3.bias"][:4])


def test_max_norm_bounds_every_units_incoming_weights_after_each_step() -> None:
    student = build_model("mlp", {"hidden": [32]}, (1, 8, 8), 3)
    with torch.no_grad():
        for param in student.parameters():
            param.mul_(20)  # start far above the bound so the constraint has work to do
    trainer = Trainer(runtime=CPU, optim=OptimSpec(lr=1e-2, max_norm=0.5), train=_data(), val=None,
                      preprocess=_Scale(), augment=None, batch_size=16, eval_batch_size=64, seed=0,
                      callbacks=Callbacks(), checkpointer=None, tracker=ProgressTracker(total_steps=100))
    trainer.fit(Stage("finetune", "student", 1, 1e-2, 2), student, cross_entropy_loss, RunState())
    linears = [module for module in student.modules() if isinstance(module, nn.Linear)]
    assert len(linears) == 2
    for linear in linears:
        row_norms = linear.weight.norm(dim=1)
        assert row_norms.max().item() <= 0.5 + 1e-5
        assert row_norms.max().item() > 0.4  # rescaled to the bound, not zeroed


def test_without_max_norm_weights_are_left_alone() -> None:
    student = build_model("mlp", {"hidden": [32]}, (1, 8, 8), 3)
    with torch.no_grad():
        for param in student.parameters():
            param.mul_(20)
    _trainer(_data()).fit(Stage("finetune", "student", 1, 1e-2, 2), student, cross_entropy_loss, RunState())
    assert student[1].weight.norm(dim=1).max().item() > 1.0


def test_mlp_input_dropout_drops_inputs_only_in_training() -> None:
    model = build_model("mlp", {"hidden": [16], "input_dropout": 0.5}, (1, 8, 8), 3)
    assert isinstance(model[1], nn.Dropout) and model[1].p == 0.5
    x = torch.ones(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


class RecordingTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.net(x)


def test_mixup_teaches_the_teacher_on_the_blends() -> None:
    data = _data()
    teacher = RecordingTeacher()
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
    _trainer(data, mixup=Mixup(1.0, num_classes=3)).fit(Stage("distill", "student", 1, 1e-2, 1), student,
                                                        build_distill_loss(MethodSpec(alpha=0.5)), RunState(),
                                                        teacher_targets=LiveTeacher(teacher, CPU))

    seen = torch.cat(teacher.inputs).flatten(1)
    originals = (data.x.float() / 255).flatten(1)
    distance_to_nearest = torch.cdist(seen, originals).min(dim=1).values
    assert len(seen) == steps_per_epoch(len(data), 16) * 16
    assert (distance_to_nearest > 1e-3).float().mean() > 0.5, "the teacher should see blends, not the samples"


def test_mixup_trains_on_blended_hard_labels() -> None:
    seen_labels: list[torch.Tensor] = []

    def recording_loss(logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        assert labels is not None
        seen_labels.append(labels)
        return cross_entropy_loss(logits, teacher, labels)

    state = RunState()
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
    _trainer(_data(), mixup=Mixup(1.0, num_classes=3)).fit(Stage("baseline", "baseline", 2, 1e-2, 3), student,
                                                           recording_loss, state)

    labels = torch.cat(seen_labels)
    assert labels.shape == (2 * 96, 3) and labels.dtype == torch.float32
    assert torch.allclose(labels.sum(dim=1), torch.ones(len(labels)))
    assert (labels.max(dim=1).values < 0.99).float().mean() > 0.5, "most samples should be blends"
    assert [row["epoch"] for row in state.history] == [1, 2]
    assert all(0.0 <= row["train_accuracy"] <= 1.0 for row in state.history)


def _separable(n: int, seed: int) -> DeviceData:
    """Class = the brightest of three pixel bands: an MLP learns it in one epoch."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = torch.randint(0, 60, (n, 1, 8, 8), dtype=torch.uint8, generator=generator)
    for band in range(3):
        rows = labels == band
        images[rows, :, band * 2:band * 2 + 2, :] += 180
    return DeviceData(images, labels)


def _collapsing_loss(good_steps: int):
    """Cross-entropy for `good_steps` steps, then towards the wrong class: training that learns, then unlearns."""
    calls = {"n": 0}

    def loss(logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        calls["n"] += 1
        assert labels is not None
        wrong = labels if calls["n"] <= good_steps else (labels + 1) % 3
        return cross_entropy_loss(logits, teacher, wrong)

    return loss


@pytest.mark.parametrize("select", ["best_val", "last"])
def test_best_val_selection_keeps_the_weights_from_before_a_late_collapse(select: str) -> None:
    from kdcore.selection import restore_best

    train, val = _separable(192, 0), _separable(96, 1)
    trainer = Trainer(runtime=CPU, optim=OptimSpec(lr=1e-2, schedule="constant"), train=train, val=val,
                      preprocess=_Scale(), batch_size=16, eval_batch_size=64, seed=0, callbacks=Callbacks(),
                      checkpointer=None, tracker=ProgressTracker(total_steps=100), select=select)
    torch.manual_seed(0)
    student = build_model("mlp", {"hidden": [16]}, (1, 8, 8), 3)
    state = RunState()
    # Two good epochs (12 steps each), then two epochs of gradient ascent.
    trainer.fit(Stage("distill", "student", 4, 1e-2, 1), student, _collapsing_loss(24), state)

    accuracies = [row["val_accuracy"] for row in state.history]
    assert accuracies[1] > 0.9 and accuracies[-1] < 0.6, accuracies  # the scenario: learnt, then collapsed
    chosen = restore_best(state.info, {"student": student})
    final = trainer.validate(student)["val_accuracy"]
    if select == "best_val":
        assert chosen["student"]["epoch"] in (1, 2)  # both validate at 100%: the lower val_loss wins the tie
        assert chosen["student"]["val_accuracy"] == max(accuracies)
        assert final == max(accuracies)
    else:
        assert chosen == {} and final == accuracies[-1]


def test_best_epoch_travels_with_the_checkpoint(tmp_path) -> None:
    train, val = _separable(96, 0), _separable(48, 1)
    checkpointer = Checkpointer(tmp_path)
    trainer = Trainer(runtime=CPU, optim=OptimSpec(lr=1e-2), train=train, val=val, preprocess=_Scale(),
                      batch_size=16, eval_batch_size=64, seed=0, callbacks=Callbacks(), checkpointer=checkpointer,
                      tracker=ProgressTracker(total_steps=100), select="best_val")
    student = build_model("mlp", {"hidden": [8]}, (1, 8, 8), 3)
    state = RunState()
    trainer.fit(Stage("baseline", "baseline", 2, 1e-2, 3), student, cross_entropy_loss, state)
    loaded = checkpointer.load()
    assert loaded is not None
    best = loaded.info["best_epochs"]["baseline"]
    assert best["epoch"] in (1, 2) and set(best["weights"]) == set(student.state_dict())
