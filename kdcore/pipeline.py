"""The staged pipeline of one job, top to bottom.

check → teacher fine-tune (knowledge extraction) → teacher cache → distillation (knowledge
transfer) → student fine-tune (model optimisation) → baseline → evaluation → export → report.
Each stage is optional; finished stages are skipped when a run resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore import export as exporting
from kdcore import report
from kdcore.augment import augment_is_random, build_augment, check_augment_fits
from kdcore.budget import check_student_budget
from kdcore.callbacks import Callbacks, CancelOnly, Progress
from kdcore.checkpoint import Checkpointer, RunState
from kdcore.data import DataBundle, Preprocess, check_labels_fit, load_data
from kdcore.distributed import Group, join, leave, rank_device
from kdcore.errors import KDError
from kdcore.evaluate import (
    agreement,
    classification_metrics,
    confusion_matrix,
    correct,
    cpu_latency_ms,
    image_example,
    parameter_count,
    size_and_speed_warnings,
    size_mb,
)
from kdcore.inference import predict_logits
from kdcore.latency import like_for_like_latency
from kdcore.limits import ResourceLimits
from kdcore.losses import build_distill_loss, cross_entropy_loss
from kdcore.mixup import build_mixup
from kdcore.models import build_model
from kdcore.runtime import (
    Runtime,
    default_threads,
    make_runtime,
    precision_warning,
    restore_rng,
    seed_everything,
    set_threads,
)
from kdcore.selection import restore_best
from kdcore.sharing import share_parameters
from kdcore.significance import gain_over_baseline
from kdcore.spec import JobSpec, for_task
from kdcore.tasks import resolve_task
from kdcore.teacher import Teacher, check_teacher_fits, load_teacher
from kdcore.teacher_cache import LiveTeacher, TeacherLogitsCache
from kdcore.teacher_check import check_message, check_teacher_accuracy, enforce
from kdcore.teacher_sniff import TeacherInfo, sniff_teacher
from kdcore.trainer import DeviceData, ProgressTracker, Stage, Trainer

STUDENT_STAGES = ("distill", "finetune")
INPUT_CONTRACT = ("float32 N x C x H x W (or N x F): stored uint8 pixels / 255, then (x - mean) / std per "
                  "channel as in normalize; returns logits in the order of class_names")


@dataclass(frozen=True)
class JobInputs:
    """Local paths of the job's files (the service downloads them first; the CLI has them already)."""

    teacher: Path
    train: Path
    test: Path | None = None
    student: Path | None = None  # text jobs: a pretrained student to start from (student.file)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    checkpoint_dir: Path | None = None
    resume: bool = True
    allow_code_teachers: bool = False
    progress_interval_s: float = 1.0
    latency_runs: int = 50
    keep_checkpoint: bool = False
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    # The teacher's logits on the training split: read when the file exists, written when it does not
    # (a tuned job's trials share the one its parent computed).
    teacher_cache: Path | None = None
    # causal_lm with method.top_k: the folder of content-addressed teacher top-K caches (one per user, say);
    # a job whose key is there trains without loading the teacher. None keeps the cache in memory only.
    lm_cache_dir: Path | None = None
    job_id: str | None = None  # the service's job id, written into the exports' metadata

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out_dir / "checkpoints"


@dataclass
class RunResult:
    metrics: dict[str, Any]
    artifacts: list[Path] = field(default_factory=list)
    resumed_from: tuple[str, int] | None = None


def plan_stages(spec: JobSpec, teacher: Teacher) -> list[Stage]:
    stages = spec.stages
    if stages.teacher_finetune_epochs and not teacher.trainable:
        raise KDError(f"a {teacher.format} teacher cannot be fine-tuned here; set stages.teacher_finetune_epochs "
                      "to 0 or hand in safetensors, a state_dict or TorchScript",
                      field="stages.teacher_finetune_epochs", code="bad_input")
    return stage_plan(spec)


def stage_plan(spec: JobSpec) -> list[Stage]:
    """The stages a spec asks for, in order, with their epochs and learning rates."""
    stages = spec.stages
    teacher_lr = spec.optim.teacher_lr or spec.optim.lr / 10
    planned = [
        ("teacher_finetune", "teacher", stages.teacher_finetune_epochs, teacher_lr),
        ("distill", "student", stages.distill_epochs, spec.optim.lr),
        ("finetune", "student", stages.finetune_epochs, spec.optim.lr),
        ("baseline", "baseline", stages.student_epochs if stages.baseline else 0, spec.optim.lr),
    ]
    return [Stage(name, key, epochs, lr, index) for index, (name, key, epochs, lr) in enumerate(planned) if epochs]


def run_job(spec: JobSpec, inputs: JobInputs, options: RunOptions, callbacks: Callbacks | None = None) -> RunResult:
    """Run one job to its artifacts; text jobs (an hf teacher) go to `kdcore.text_pipeline`."""
    callbacks = callbacks or Callbacks()
    task = resolve_task(spec, sniff_teacher(inputs.teacher))
    if spec.distributed.nproc > 1 and spec.distributed.strategy == "fsdp" and task == "image_classification":
        raise KDError("fsdp shards the transformer students of text jobs; image jobs train with strategy ddp",
                      field="distributed.strategy", code="bad_input")
    if task == "text_classification":
        from kdcore.text_pipeline import run_text_job

        return run_text_job(for_task(spec, task), inputs, options, callbacks)
    if task == "causal_lm":
        from kdcore.lm_pipeline import run_lm_job

        return run_lm_job(for_task(spec, task), inputs, options, callbacks)
    spec = for_task(spec, task)
    runtime = make_runtime(rank_device(spec.device), spec.precision)
    group = join(spec.distributed, runtime.device)
    set_threads(_rank_threads(spec, group, runtime))
    if not group.is_main:
        # One voice: rank 0 reports progress and writes checkpoints, artifacts and the report.
        callbacks = CancelOnly(callbacks)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    if (warning := precision_warning(runtime)) is not None:
        callbacks.on_log(f"warning: {warning}")

    # check: load everything and run one batch through the teacher, so bad input fails in seconds.
    announce(callbacks, "check")
    seed_everything(spec.seed)
    limits = options.limits
    data = _with_teacher_classes(load_data(spec.data, train_path=inputs.train, test_path=inputs.test,
                                           seed=spec.seed, limits=limits.archive),
                                 sniff_teacher(inputs.teacher, archive_limits=limits.archive))
    # Before the teacher or the student take any memory: their sizes are known from shapes alone.
    check_student_budget(spec.student.arch or "mlp", spec.student.arch_args, data.input_shape, data.num_classes,
                         spec.batch_size, limits)
    teacher = load_teacher(spec.teacher, inputs.teacher, input_shape=data.input_shape, num_classes=data.num_classes,
                           allow_code=options.allow_code_teachers, device=runtime.device,
                           onnx_arena_bytes=limits.onnx_arena_bytes)
    check_augment_fits(spec.data.augment, data.input_shape)
    preprocess = data.preprocess.to(runtime.device)
    check_teacher_fits(teacher, preprocess(data.train.x[:4].to(runtime.device)), data.num_classes)
    teacher.module.eval().requires_grad_(False)
    stages = plan_stages(spec, teacher)
    teacher_check = _check_teacher_accuracy(spec, data, teacher, preprocess, runtime, callbacks)

    checkpointer = Checkpointer(options.checkpoints)
    state = (checkpointer.load() if options.resume else None) or RunState()
    resumed_from = (state.stage, state.epoch) if state.stage else None
    if state.stage:
        callbacks.on_log(f"resuming from the checkpoint after {state.stage} epoch {state.epoch}")
        callbacks.on_resume(state.stage, state.epoch)

    train = DeviceData(data.train.x.to(runtime.device), data.train.y.to(runtime.device))
    val = DeviceData(data.val.x.to(runtime.device), data.val.y.to(runtime.device)) if data.val else None
    trainer = Trainer(
        runtime=runtime, optim=spec.optim, train=train, val=val, preprocess=preprocess,
        augment=build_augment(spec.data.augment, fill=preprocess.zero_value),
        mixup=build_mixup(spec.data.mixup, data.num_classes),
        batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size,
        seed=spec.seed, callbacks=callbacks, checkpointer=checkpointer if group.is_main else None,
        tracker=ProgressTracker(total_steps=0), progress_interval_s=options.progress_interval_s,
        select=spec.stages.select, group=group,
    )
    trainer.tracker.total_steps = sum(stage.epochs for stage in stages) * trainer.steps_per_epoch
    trainer.tracker.skip_to(steps_done(stages, state, trainer.steps_per_epoch))

    models = _build_models(spec, data, teacher, state)
    if state.rng is not None:
        # Dropout draws from the global generator: continue it exactly where the checkpoint left it.
        restore_rng(state.rng)
    for stage in stages:
        if stage_finished(stage, stages, state):
            continue
        model = models[stage.model_key].to(runtime.device)
        if stage.name == "teacher_finetune":
            teacher.module.requires_grad_(True)
            trainer.fit(stage, model, cross_entropy_loss, state)
            teacher.module.eval().requires_grad_(False)
        elif stage.name == "distill":
            targets = _teacher_targets(spec, teacher, train, preprocess, runtime, callbacks, options.teacher_cache,
                                       group)
            trainer.fit(stage, model, build_distill_loss(spec.method), state, teacher_targets=targets)
        else:
            trainer.fit(stage, model, cross_entropy_loss, state)

    leave(group)  # training was the group's work; evaluation, exports and the report are rank 0's
    if not group.is_main:
        return RunResult(metrics={}, resumed_from=resumed_from)
    selected = restore_best(state.info, models) if spec.stages.select == "best_val" else {}

    announce(callbacks, "evaluate", fraction=1.0)
    metrics = _evaluate(spec, data, inputs, models, preprocess, runtime, options, state)
    metrics["selected_epochs"] = selected
    if group.active:
        metrics["distributed"] = {"world_size": group.world, "strategy": spec.distributed.strategy,
                                  "global_batch": spec.batch_size, "per_rank_batch": spec.batch_size / group.world,
                                  "backend": "nccl" if runtime.device.type == "cuda" else "gloo"}
    if teacher_check is not None:
        metrics["teacher_check"] = teacher_check
        if not teacher_check["passed"]:
            metrics.setdefault("warnings", []).append(check_message(teacher_check))
    announce(callbacks, "export", fraction=1.0)
    artifacts = _export(spec, data, models, metrics, options)
    announce(callbacks, "report", fraction=1.0)
    artifacts += write_reports(spec, data.source, metrics, state, options)
    if not options.keep_checkpoint:
        checkpointer.clear()
    return RunResult(metrics=metrics, artifacts=artifacts, resumed_from=resumed_from)


def _rank_threads(spec: JobSpec, group: Group, runtime: Runtime) -> int | None:
    """CPU ranks split the cores between them unless the spec says otherwise: oversubscribed ranks crawl."""
    if spec.threads is not None or not group.active or runtime.device.type != "cpu":
        return spec.threads
    return max(1, default_threads() // group.world)


def _check_teacher_accuracy(spec: JobSpec, data: DataBundle, teacher: Teacher, preprocess: Preprocess,
                            runtime: Runtime, callbacks: Callbacks) -> dict[str, Any] | None:
    """stages.teacher_check: the teacher on held-out data before any training; fails fast near chance."""
    if spec.stages.teacher_check == "off":
        return None
    split = data.val if data.val is not None and len(data.val) else data.train
    result = check_teacher_accuracy(
        teacher.module, x=split.x, y=split.y, train_x=data.train.x,
        split="validation split" if split is data.val else "training split (val_fraction is 0)",
        preprocess=preprocess, num_classes=data.num_classes, runtime=runtime, batch_size=spec.eval_batch_size)
    callbacks.on_log(f"teacher check: {100 * result['accuracy']:.1f}% on {result['samples']} samples of the "
                     f"{result['split']} (chance {100 * result['chance']:.1f}%)")
    warning = enforce(result, spec.stages.teacher_check, teacher_adapts=spec.stages.teacher_finetune_epochs > 0)
    if warning is not None:
        callbacks.on_log(f"warning: {warning}")
    return result


def _with_teacher_classes(data: DataBundle, info: TeacherInfo) -> DataBundle:
    """The teacher's output count is the class count, as long as every label fits in it.

    A teacher may know classes absent from this data (labels 0..8 of a 10-way teacher).
    """
    if info.output_size is None or info.output_size == data.num_classes:
        return data
    check_labels_fit(data, info.output_size)
    names = data.class_names + [str(i) for i in range(len(data.class_names), info.output_size)]
    return dataclasses.replace(data, num_classes=info.output_size, class_names=names[:info.output_size])


def announce(callbacks: Callbacks, stage: str, *, fraction: float = 0.0) -> None:
    callbacks.on_stage_start(stage, 0)
    callbacks.on_progress(Progress(stage=stage, epoch=0, epochs=0, step=0, steps=0, fraction=fraction))


def stage_finished(stage: Stage, stages: list[Stage], state: RunState) -> bool:
    """A stage is done when the checkpoint is past it, or at its last epoch."""
    if state.stage is None:
        return False
    names = [s.name for s in stages]
    checkpoint_index = names.index(state.stage)
    index = names.index(stage.name)
    return index < checkpoint_index or (index == checkpoint_index and state.epoch >= stage.epochs)


def steps_done(stages: list[Stage], state: RunState, steps_per_epoch: int) -> int:
    done = 0
    for stage in stages:
        if stage_finished(stage, stages, state):
            done += stage.epochs * steps_per_epoch
        elif stage.name == state.stage:
            done += state.epoch * steps_per_epoch
    return done


def _build_models(spec: JobSpec, data: DataBundle, teacher: Teacher, state: RunState) -> dict[str, nn.Module]:
    """The run's models, from the checkpoint where it has them. Student and baseline share one initialisation."""
    def fresh_student() -> nn.Module:
        torch.manual_seed(spec.seed)
        return build_model(spec.student.arch or "mlp", spec.student.arch_args, data.input_shape, data.num_classes)

    student = fresh_student()
    if spec.student.init_from_teacher and "student" not in state.models:
        state.info["shared_parameters"] = share_parameters(teacher.module, student)
    models = {"teacher": teacher.module, "student": student, "baseline": fresh_student()}
    for key, weights in state.models.items():
        models[key].load_state_dict(weights)
    return models


def _teacher_targets(spec: JobSpec, teacher: Teacher, train: DeviceData, preprocess: nn.Module, runtime: Runtime,
                     callbacks: Callbacks, cache_file: Path | None = None,
                     group: Group | None = None) -> TeacherLogitsCache | LiveTeacher:
    if augment_is_random(spec.data.augment) or spec.data.mixup > 0:
        return LiveTeacher(teacher.module, runtime)
    if cache_file is not None and cache_file.exists():
        logits = torch.load(cache_file, map_location=runtime.device, weights_only=True)
        if isinstance(logits, torch.Tensor) and logits.shape[0] == len(train):
            callbacks.on_log("teacher logits read from the shared cache, not recomputed")
            return TeacherLogitsCache(logits)
    # No random augmentation or mixup: the teacher sees the same inputs every epoch, so one pass is enough.
    announce(callbacks, "teacher_cache")
    group = group or Group()

    def rows(start: int, end: int) -> torch.Tensor:
        part = TeacherLogitsCache.compute(teacher.module, train.x[start:end], preprocess=preprocess, runtime=runtime,
                                          batch_size=spec.eval_batch_size)
        return part.logits.float()

    # Each rank computes its slice of the training set once; the slices are joined on every rank.
    cache = TeacherLogitsCache.from_logits(group.gather_rows(rows, len(train)), runtime)
    if cache_file is not None and group.is_main:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cache.logits.cpu(), cache_file)
    return cache


def _eval_split(data: DataBundle) -> tuple[str, torch.Tensor, torch.Tensor]:
    if data.test is not None:
        return "test split", data.test.x, data.test.y
    if data.val is not None:
        return "validation split (no test set was given)", data.val.x, data.val.y
    return "training data (no test set and val_fraction 0: accuracy is optimistic)", data.train.x, data.train.y


def _evaluate(spec: JobSpec, data: DataBundle, inputs: JobInputs, models: dict[str, nn.Module], preprocess: nn.Module,
              runtime: Runtime, options: RunOptions, state: RunState) -> dict[str, Any]:
    split_name, x, y = _eval_split(data)
    logits: dict[str, torch.Tensor] = {}
    results: dict[str, Any] = {}
    keys = ["teacher", "student"] + (["baseline"] if spec.stages.baseline else [])
    for key in keys:
        model = models[key]
        logits[key] = predict_logits(model, x, preprocess=preprocess, runtime=runtime,
                                     batch_size=spec.eval_batch_size)
        results[key] = {
            **classification_metrics(logits[key], y, data.num_classes),
            "params": parameter_count(model),
            "size_mb": size_mb(model, inputs.teacher if key == "teacher" else None),
        }
    latency = like_for_like_latency({key: models[key] for key in keys}, data.input_shape, runs=options.latency_runs)
    for key in keys:
        results[key]["latency_ms"] = latency.ms[key]
        models[key].to(runtime.device)
    student, teacher_metrics = results["student"], results["teacher"]
    warnings = latency.warnings + size_and_speed_warnings(teacher_metrics, student, latency.runtime)
    results.update(
        latency_runtime=latency.runtime,
        agreement=agreement(logits["student"], logits["teacher"]),
        compression=teacher_metrics["size_mb"] / max(student["size_mb"], 1e-9),
        speedup=teacher_metrics["latency_ms"] / max(student["latency_ms"], 1e-9),
        eval_split=split_name,
        eval_samples=len(y),
        class_names=data.class_names,
        student_confusion=confusion_matrix(logits["student"], y, data.num_classes),
        shared_parameters=state.info.get("shared_parameters", 0),
    )
    if "baseline" in results:
        results.update(gain_over_baseline(correct(logits["student"], y), correct(logits["baseline"], y),
                                          seed=spec.seed))
    if spec.quantize == "dynamic_int8":
        results["student_int8"] = _evaluate_int8(models["student"], x, y, data, preprocess, options)
    if warnings:
        results["warnings"] = warnings
    return results


def _evaluate_int8(student: nn.Module, x: torch.Tensor, y: torch.Tensor, data: DataBundle, preprocess: nn.Module,
                   options: RunOptions) -> dict[str, Any]:
    quantized = exporting.quantize_dynamic_int8(student)
    cpu = Runtime(device=torch.device("cpu"), precision="fp32")
    logits = predict_logits(quantized, x, preprocess=preprocess.cpu(), runtime=cpu, batch_size=1024)
    preprocess.to(next(iter(student.parameters())).device)
    return {
        **classification_metrics(logits, y, data.num_classes),
        "params": parameter_count(student),
        "size_mb": exporting.quantized_size_mb(quantized),
        "latency_ms": cpu_latency_ms(quantized, image_example(data.input_shape), runs=options.latency_runs),
    }


def _export(spec: JobSpec, data: DataBundle, models: dict[str, nn.Module], metrics: dict[str, Any],
            options: RunOptions) -> list[Path]:
    student = models["student"].cpu().eval()
    out = options.out_dir

    def metadata(arch: str | None, arch_args: dict[str, Any]) -> dict[str, Any]:
        # The contract of the file: what it takes (shape, scaling, normalisation), what its outputs mean, whence.
        return {"arch": arch, "arch_args": arch_args, "input_shape": list(data.input_shape),
                "input": INPUT_CONTRACT, "num_classes": data.num_classes, "class_names": data.class_names,
                "normalize": spec.data.normalize.model_dump(), "job_id": options.job_id}

    artifacts = []
    if spec.stages.teacher_finetune_epochs:
        # The adapted teacher is worth keeping: it is what the student learnt from.
        artifacts.append(exporting.export_safetensors(models["teacher"].cpu(), out / "teacher_finetuned.safetensors",
                                                      metadata(spec.teacher.arch, spec.teacher.arch_args)))
    if "safetensors" in spec.export:
        artifacts.append(exporting.export_safetensors(student, out / "student.safetensors",
                                                      metadata(spec.student.arch, spec.student.arch_args)))
    if "torchscript" in spec.export:
        artifacts.append(exporting.export_torchscript(student, out / "student.ts", data.input_shape))
    if "onnx" in spec.export:
        artifacts.append(exporting.export_onnx(student, out / "student.onnx", data.input_shape,
                                               metadata(spec.student.arch, spec.student.arch_args)))
    if spec.quantize == "dynamic_int8":
        quantized = exporting.quantize_dynamic_int8(student)
        artifacts.append(exporting.export_torchscript(quantized, out / "student_int8.ts", data.input_shape))
    return artifacts


def write_reports(spec: JobSpec, source: str, metrics: dict[str, Any], state: RunState,
                  options: RunOptions) -> list[Path]:
    out = options.out_dir
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2))
    tensorboard_dir = out / "tensorboard"
    shutil.rmtree(tensorboard_dir, ignore_errors=True)
    report.write_tensorboard(state.history, tensorboard_dir)
    if metrics.get("task") == "causal_lm":
        from kdcore.lm_report import write_lm_report_md

        model_card = write_lm_report_md(spec, metrics, source, out / "report.md")
    else:
        model_card = report.write_report_md(spec, metrics, source, out / "report.md")
    return [
        metrics_path,
        report.write_history_csv(state.history, out / "history.csv"),
        report.write_curves_png(state.history, out / "curves.png"),
        model_card,
        *sorted(p for p in tensorboard_dir.rglob("*") if p.is_file()),
    ]



def prepare_teacher_cache(spec: JobSpec, inputs: JobInputs, options: RunOptions,
                          callbacks: Callbacks | None = None) -> Path | None:
    """A tuned job's first step: check the inputs as a run does, and compute the teacher's logits once.

    Returns `options.teacher_cache` once written, or None when the teacher must run live (random
    augmentation, mixup) and there is nothing to share.
    """
    callbacks = callbacks or Callbacks()
    set_threads(spec.threads)
    runtime = make_runtime(spec.device, spec.precision)
    announce(callbacks, "check")
    seed_everything(spec.seed)
    data = _with_teacher_classes(load_data(spec.data, train_path=inputs.train, test_path=inputs.test,
                                           seed=spec.seed), sniff_teacher(inputs.teacher))
    teacher = load_teacher(spec.teacher, inputs.teacher, input_shape=data.input_shape, num_classes=data.num_classes,
                           allow_code=options.allow_code_teachers, device=runtime.device)
    check_augment_fits(spec.data.augment, data.input_shape)
    preprocess = data.preprocess.to(runtime.device)
    check_teacher_fits(teacher, preprocess(data.train.x[:4].to(runtime.device)), data.num_classes)
    plan_stages(spec, teacher)
    teacher.module.eval().requires_grad_(False)
    # Once here, so a teacher near chance fails the search before it queues trials that would each fail.
    _check_teacher_accuracy(spec, data, teacher, preprocess, runtime, callbacks)
    if options.teacher_cache is None or augment_is_random(spec.data.augment) or spec.data.mixup > 0:
        return None
    train = DeviceData(data.train.x.to(runtime.device), data.train.y.to(runtime.device))
    _teacher_targets(spec, teacher, train, preprocess, runtime, callbacks, options.teacher_cache)
    return options.teacher_cache
