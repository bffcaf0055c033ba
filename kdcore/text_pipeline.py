"""The staged pipeline of a text classification job (an hf teacher), top to bottom.

The same stages as images (`kdcore.pipeline`): check → teacher fine-tune → teacher cache →
distillation → student fine-tune → baseline → evaluation → export → report, with the same
checkpoints, resume, cancel and progress. What differs is the data (token ids batched by length),
the models (transformers classifiers, or a BiLSTM), `kd_hidden` and the exports.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore import export as image_export
from kdcore import text_export
from kdcore.architectures import HFArgs, TextBiLSTMArgs
from kdcore.callbacks import Callbacks, CancelOnly
from kdcore.checkpoint import Checkpointer, RunState
from kdcore.distributed import Group, join, leave, rank_device, rank_threads, report
from kdcore.errors import KDError
from kdcore.evaluate import (
    agreement,
    classification_metrics,
    confusion_matrix,
    correct,
    cpu_latency_ms,
    size_and_speed_warnings,
    size_mb,
)
from kdcore.hf_models import (
    HfFolder,
    StudentPlan,
    TextClassifier,
    build_hf_student,
    build_text_bilstm,
    deployable,
    load_pretrained_student,
    load_teacher_classifier,
    load_tokenizer,
    student_parameters_on_meta,
    unpack_hf_zip,
)
from kdcore.limits import check_parameters
from kdcore.losses import LossFn, build_distill_loss, cross_entropy_loss, kd_hidden_loss
from kdcore.pipeline import (
    JobInputs,
    RunOptions,
    RunResult,
    announce,
    plan_stages,
    stage_finished,
    steps_done,
    write_reports,
)
from kdcore.runtime import Runtime, make_runtime, precision_warning, restore_rng, seed_everything, set_threads
from kdcore.selection import restore_best
from kdcore.sharding import (
    has_sharded,
    is_sharded,
    remove_stale,
    restore_shards,
    shard_model,
    teacher_bytes_bf16,
    teacher_should_shard,
    unshard,
)
from kdcore.significance import gain_over_baseline
from kdcore.spec import JobSpec
from kdcore.teacher import Teacher
from kdcore.teacher_cache import LiveTeacher, TeacherLogitsCache
from kdcore.teacher_check import check_message, enforce, label_orders_tried, score_predictions
from kdcore.teacher_sniff import sniff_teacher
from kdcore.text_data import TextData, TokenBatch, TokenBatches, TokenizedSplit, collate, load_text_data
from kdcore.trainer import ProgressTracker, Stage, Trainer

LATENCY_TOKENS = 128  # the sequence length CPU latency is stated for (or max_length where shorter)
DISAGREEMENTS_SHOWN = 8


def run_text_job(spec: JobSpec, inputs: JobInputs, options: RunOptions, callbacks: Callbacks) -> RunResult:
    runtime = make_runtime(rank_device(spec.device), spec.precision)
    if spec.distributed.strategy == "fsdp" and spec.distributed.nproc > 1 and spec.student.arch != "hf":
        raise KDError(f"fsdp shards transformer students; a {spec.student.arch} student trains with strategy ddp",
                      field="distributed.strategy", code="bad_input")
    group = join(spec.distributed, runtime.device)
    set_threads(rank_threads(spec.threads, group, runtime.device))
    if not group.is_main:
        # One voice: rank 0 reports progress and writes the checkpoint file, artifacts and the report.
        callbacks = CancelOnly(callbacks)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    if (warning := precision_warning(runtime)) is not None:
        callbacks.on_log(f"warning: {warning}")
    # Each rank unpacks the hf zips into its own folder: two ranks writing one file would race.
    scratch = options.out_dir / (f"hf-rank{group.rank}" if group.active else "hf")
    try:
        return _run(spec, inputs, options, callbacks, runtime, scratch, group)
    finally:
        leave(group)
        shutil.rmtree(scratch, ignore_errors=True)


def _run(spec: JobSpec, inputs: JobInputs, options: RunOptions, callbacks: Callbacks, runtime: Runtime,
         scratch: Path, group: Group) -> RunResult:
    announce(callbacks, "check")
    seed_everything(spec.seed)
    folder = unpack_hf_zip(inputs.teacher, scratch / "teacher", field="teacher.file")
    tokenizer = load_tokenizer(folder, field="teacher.file")
    data = load_text_data(spec.data, train_path=inputs.train, test_path=inputs.test, tokenizer=tokenizer,
                          seed=spec.seed, teacher_labels=folder.info.labels)
    if spec.student.file is None:
        # Before the teacher or the student take memory: a giant config fails here in seconds.
        check_parameters(student_parameters_on_meta(folder, spec.student.arch, spec.student.arch_args,
                                                    num_classes=data.num_classes), options.limits)
    if not folder.info.has_classifier and spec.stages.teacher_finetune_epochs == 0:
        raise KDError("the teacher is a base model without a classification head; set "
                      "stages.teacher_finetune_epochs (2-3 is usual) so it learns one on this data first",
                      field="stages.teacher_finetune_epochs", code="bad_input")
    teacher_model = load_teacher_classifier(folder, data.class_names).to(runtime.device)
    pad_id = int(tokenizer.pad_token_id)
    train = TokenBatches(data.train, pad_id=pad_id, device=runtime.device)
    val = TokenBatches(data.val, pad_id=pad_id, device=runtime.device) if data.val is not None else None
    _check_one_batch(teacher_model, train, data.num_classes)
    callbacks.on_log(f"data: {len(data.train)} train, {len(data.val) if data.val else 0} validation, "
                     f"{len(data.test) if data.test else 0} test examples; {data.info['truncated']} truncated to "
                     f"{data.max_length} tokens")
    teacher = Teacher(teacher_model, "hf", True, None, sniff_teacher(inputs.teacher), runtime.device)
    stages = plan_stages(spec, teacher)
    teacher_check = _check_teacher_accuracy(spec, data, teacher_model, pad_id, runtime, callbacks)

    checkpointer = Checkpointer(options.checkpoints)
    state = (checkpointer.load() if options.resume else None) or RunState()
    resumed_from = (state.stage, state.epoch) if state.stage else None
    if state.stage:
        callbacks.on_log(f"resuming from the checkpoint after {state.stage} epoch {state.epoch}")
        callbacks.on_resume(state.stage, state.epoch)

    # Every rank gets the checkpointer: under fsdp each writes its shards; checkpoint.pt is rank 0's alone.
    trainer = Trainer(
        runtime=runtime, optim=spec.optim, train=train, val=val, batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size, seed=spec.seed, callbacks=callbacks, checkpointer=checkpointer,
        tracker=ProgressTracker(total_steps=0), progress_interval_s=options.progress_interval_s,
        select=spec.stages.select, group=group,
    )
    trainer.tracker.total_steps = sum(stage.epochs for stage in stages) * trainer.steps_per_epoch
    trainer.tracker.skip_to(steps_done(stages, state, trainer.steps_per_epoch))

    models: dict[str, nn.Module] = {"teacher": teacher_model}
    if "teacher" in state.models:
        teacher_model.load_state_dict(state.models["teacher"])
    _load_shards(["teacher"], models, state, trainer, runtime)
    student_plan: StudentPlan | None = None
    if state.rng is not None:
        restore_rng(state.rng)
    for stage in stages:
        if stage.model_key != "teacher" and student_plan is None:
            # Built after the teacher's fine-tune: the layer copy takes the adapted teacher.
            student_plan = _students(spec, inputs, folder, tokenizer, teacher_model, data, scratch, state, models)
            _load_shards(["student", "baseline"], models, state, trainer, runtime)
            if state.rng is not None and _checkpointed_after_students(state, stages):
                # Building a student reseeds the global RNG; a checkpoint taken later holds the stream to go on with.
                restore_rng(state.rng)
        if stage_finished(stage, stages, state):
            continue
        model = models[stage.model_key].to(runtime.device)
        if stage.name == "teacher_finetune":
            teacher_model.requires_grad_(True)
            trainer.fit(stage, model, cross_entropy_loss, state)
        elif stage.name == "distill":
            teacher_model.eval().requires_grad_(False)
            targets, loss = _distill_setup(spec, teacher_model, model, train, runtime, callbacks, group)
            trainer.fit(stage, model, loss, state, teacher_targets=targets)
            _stop_capturing(teacher_model, model)
        else:
            trainer.fit(stage, model, cross_entropy_loss, state)
        teacher_model.eval().requires_grad_(False)
    if student_plan is None:  # no student stage ran (cannot happen: the spec requires one), kept total
        student_plan = _students(spec, inputs, folder, tokenizer, teacher_model, data, scratch, state, models)

    teacher_layout = "sharded" if is_sharded(models["teacher"]) else "replicated"
    _gather_models(models, runtime, group)
    leave(group)  # training was the group's work; evaluation, exports and the report are rank 0's
    if not group.is_main:
        return RunResult(metrics={}, resumed_from=resumed_from)
    selected = restore_best(state.info, models) if spec.stages.select == "best_val" else {}

    announce(callbacks, "evaluate", fraction=1.0)
    metrics = _evaluate(spec, data, models, student_plan, pad_id, runtime, options, state)
    metrics["selected_epochs"] = selected
    if group.active:
        metrics["distributed"] = _distributed_metrics(spec, group, runtime, teacher_layout)
    if teacher_check is not None:
        metrics["teacher_check"] = teacher_check
        if not teacher_check["passed"]:
            metrics.setdefault("warnings", []).append(check_message(teacher_check))
    announce(callbacks, "export", fraction=1.0)
    artifacts = _export(spec, data, models, tokenizer, student_plan, options)
    announce(callbacks, "report", fraction=1.0)
    source = f"{data.source}: {len(data.train)} training, {len(data.val) if data.val else 0} validation examples"
    artifacts += write_reports(spec, source, metrics, state, options)
    if not options.keep_checkpoint:
        checkpointer.clear()
        remove_stale(checkpointer.directory, None)
    return RunResult(metrics=metrics, artifacts=artifacts, resumed_from=resumed_from)


def _distributed_metrics(spec: JobSpec, group: Group, runtime: Runtime, teacher_layout: str) -> dict[str, Any]:
    figures: dict[str, Any] = report(group, spec.distributed.strategy, spec.batch_size, runtime.device)
    if group.sharded:
        figures["teacher"] = teacher_layout
    return figures


def _load_shards(keys: list[str], models: dict[str, nn.Module], state: RunState, trainer: Trainer,
                 runtime: Runtime) -> None:
    for key in keys:
        if has_sharded(state.info, key):
            models[key].to(runtime.device)  # in place: DCP reads into the model where it will train
    restore_shards(keys, models, checkpoints=trainer.checkpointer.directory if trainer.checkpointer else None,
                   info=state.info, sharded=trainer.group.sharded, sharded_models=trainer.sharded_models,
                   plain_weights=state.models)


def _gather_models(models: dict[str, nn.Module], runtime: Runtime, group: Group) -> None:
    """After training: rank 0 gets a plain copy of every sharded model (a collective, on every rank)."""
    for key in sorted(models):
        if is_sharded(models[key]):
            plain = unshard(models[key], runtime.device, is_main=group.is_main)
            if plain is not None:
                models[key] = plain


def _checkpointed_after_students(state: RunState, stages: list[Stage]) -> bool:
    return any(stage.name == state.stage and stage.model_key != "teacher" for stage in stages)


def _check_teacher_accuracy(spec: JobSpec, data: TextData, teacher: TextClassifier, pad_id: int, runtime: Runtime,
                            callbacks: Callbacks) -> dict[str, Any] | None:
    """stages.teacher_check for a teacher that is a classifier already: its score before any training.

    A teacher fine-tuned on this data first is not checked: its head is about to be trained, so its
    score now says nothing. The whole validation split is scored (one pass, as at every epoch's end);
    of the image check's alternatives only the label order applies to text.
    """
    if spec.stages.teacher_check == "off" or spec.stages.teacher_finetune_epochs > 0:
        return None
    has_val = data.val is not None and len(data.val) > 0
    split = data.val if has_val and data.val is not None else data.train
    logits = predict_text_logits(teacher, TokenBatches(split, pad_id=pad_id, device=runtime.device), runtime,
                                 spec.eval_batch_size)
    result = score_predictions(logits, split.labels, num_classes=data.num_classes,
                               split="validation split" if has_val else "training split (val_fraction is 0)")
    if not result["passed"]:
        result["tried"] = label_orders_tried(logits, split.labels, data.num_classes)
    callbacks.on_log(f"teacher check: {100 * result['accuracy']:.1f}% on {result['samples']} examples of the "
                     f"{result['split']} (chance {100 * result['chance']:.1f}%)")
    if (warning := enforce(result, spec.stages.teacher_check, teacher_adapts=False)) is not None:
        callbacks.on_log(f"warning: {warning}")
    return result


def _check_one_batch(teacher: TextClassifier, train: TokenBatches, num_classes: int) -> None:
    batch, _ = train.train_batch(torch.arange(min(4, len(train))), torch.Generator())
    with torch.inference_mode():
        logits = teacher.eval()(batch)
    if logits.shape[-1] != num_classes:
        raise KDError(f"the teacher gives {logits.shape[-1]} outputs, the data has {num_classes} classes",
                      field="teacher.file", code="teacher_data_mismatch")


def _student(spec: JobSpec, inputs: JobInputs, tokenizer: Any, teacher: TextClassifier, data: TextData,
             scratch: Path, state: RunState) -> StudentPlan:
    student = spec.student
    if student.file is not None:
        if student.arch_args or student.teacher_layers:
            raise KDError("a pretrained student (student.file) is used as it is: drop arch_args and teacher_layers",
                          field="student.file", code="bad_input")
        pretrained = unpack_hf_zip(inputs.student or Path(student.file), scratch / "student", field="student.file")
        plan = load_pretrained_student(pretrained, tokenizer, data.class_names)
    elif student.arch == "text_bilstm":
        plan = build_text_bilstm(teacher, TextBiLSTMArgs.model_validate(student.arch_args),
                                 num_classes=data.num_classes, pad_id=int(tokenizer.pad_token_id), seed=spec.seed)
    else:
        plan = build_hf_student(teacher, HFArgs.model_validate(student.arch_args), seed=spec.seed,
                                init_from_teacher=student.init_from_teacher, teacher_layers=student.teacher_layers)
    if "shared_parameters" not in state.info:
        state.info["shared_parameters"] = plan.shared_parameters
        state.info["student"] = plan.description
        state.info["teacher_layers"] = plan.teacher_layers
    return plan


def _students(spec: JobSpec, inputs: JobInputs, folder: HfFolder, tokenizer: Any, teacher: TextClassifier,
              data: TextData, scratch: Path, state: RunState, models: dict[str, nn.Module]) -> StudentPlan:
    """Student and baseline from one initialisation (layer copy included), then their checkpointed weights."""
    plan = _student(spec, inputs, tokenizer, teacher, data, scratch, state)
    models.update(student=plan.model, baseline=copy.deepcopy(plan.model))
    if spec.method.name == "kd_hidden":
        _attach_projection(plan.model, teacher)
    for key in ("student", "baseline"):
        if key in state.models:
            models[key].load_state_dict(state.models[key])
    return plan


def _attach_projection(student: nn.Module, teacher: TextClassifier) -> None:
    """A learned map from the student's width to the teacher's: trained with the student, never shipped."""
    assert isinstance(student, TextClassifier)
    widths = (student.model.config.hidden_size, teacher.model.config.hidden_size)
    student.add_module("distill_projection", nn.Identity() if widths[0] == widths[1] else nn.Linear(*widths))


def _stop_capturing(*models: nn.Module) -> None:
    for model in models:
        if isinstance(model, TextClassifier):
            model.capture_hidden, model.hidden_states = False, None


def _distill_setup(spec: JobSpec, teacher: TextClassifier, student: nn.Module, train: TokenBatches,
                   runtime: Runtime, callbacks: Callbacks, group: Group) -> tuple[Any, LossFn]:
    if group.sharded and not is_sharded(teacher) and teacher_should_shard(teacher,
                                                                        spec.distributed.replicate_teacher_mb):
        callbacks.on_log(f"the teacher's {teacher_bytes_bf16(teacher) / 2**20:.0f} MB (bf16) exceed "
                         f"distributed.replicate_teacher_mb: it is sharded across the {group.world} ranks")
        shard_model(teacher.to(runtime.device))
    if spec.method.name != "kd_hidden":
        announce(callbacks, "teacher_cache")
        logits = group.gather_rows(lambda start, end: _teacher_rows(teacher, train, start, end, spec.eval_batch_size,
                                                                    runtime, group), len(train))
        cache = TeacherLogitsCache.from_logits(logits, runtime)
        return cache, build_distill_loss(spec.method)
    return LiveTeacher(teacher, runtime), _hidden_loss(spec, teacher, student)


def _teacher_rows(teacher: TextClassifier, train: TokenBatches, start: int, end: int, batch_size: int,
                  runtime: Runtime, group: Group) -> torch.Tensor:
    """The teacher's logits on training rows start..end, this rank's slice of the one cache pass.

    One pass in fp32 whatever the job's precision: bf16 would round every cached logit. A sharded
    teacher's forward is a collective, so every rank then runs as many batches: a shorter slice
    repeats its last row up to the longest slice's length, and the extra logits are dropped.
    """
    rows = torch.arange(start, end)
    if is_sharded(teacher):
        width = group.slice_width(len(train))
        rows = torch.cat([rows, rows[-1:].expand(width - len(rows)) if len(rows) else torch.zeros(width,
                                                                                                 dtype=torch.long)])
    fp32 = Runtime(device=runtime.device, precision="fp32")
    outputs = [torch.empty(0, teacher.model.config.num_labels)]
    with torch.inference_mode():
        teacher.eval()
        for first in range(0, len(rows), batch_size):
            with fp32.autocast():
                outputs.append(teacher(train.collate(rows[first:first + batch_size])).float().cpu())
    # On the training device: NCCL gathers GPU tensors only.
    return torch.cat(outputs)[: end - start].to(runtime.device)


def _hidden_loss(spec: JobSpec, teacher: TextClassifier, student: nn.Module) -> LossFn:
    """kd on the logits plus the cosine between student layer i and teacher layer teacher_layers[i]."""
    assert isinstance(student, TextClassifier)
    depth = student.model.config.num_hidden_layers
    teacher_depth = teacher.model.config.num_hidden_layers
    layers = spec.student.teacher_layers or _default_layers(teacher_depth, depth)
    projection: nn.Module = getattr(student, "distill_projection", nn.Identity())
    teacher.capture_hidden = student.capture_hidden = True
    method = spec.method

    def loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        assert teacher_logits is not None and student.hidden_states is not None and teacher.hidden_states is not None
        student_hidden = [projection(student.hidden_states[i + 1]) for i in range(depth)]
        # The teacher ran under inference mode: a clone outside it can be used by autograd.
        teacher_hidden = [teacher.hidden_states[t + 1].clone() for t in layers]
        mask = student.attention_mask if student.attention_mask is not None else torch.ones_like(logits[:, :1])
        return kd_hidden_loss(logits, teacher_logits, labels, student_hidden=student_hidden,
                              teacher_hidden=teacher_hidden, mask=mask, temperature=method.temperature,
                              alpha=method.alpha, hidden_weight=method.hidden_weight)

    return loss


def _default_layers(teacher_depth: int, depth: int) -> list[int]:
    from kdcore.hf_models import evenly_spaced

    return evenly_spaced(teacher_depth, depth)


@torch.inference_mode()
def predict_text_logits(model: nn.Module, batches: TokenBatches, runtime: Runtime, batch_size: int,
                        *, precision: str | None = None) -> torch.Tensor:
    model.eval()
    run = runtime if precision is None else Runtime(device=runtime.device, precision=precision)
    outputs = []
    for inputs, _ in batches.eval_batches(batch_size):
        with run.autocast():
            outputs.append(model(inputs).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


# --- evaluation -----------------------------------------------------------------------------------------


def _eval_split(data: TextData) -> tuple[str, TokenizedSplit]:
    if data.test is not None:
        return "test split", data.test
    if data.val is not None:
        return "validation split (no test set was given)", data.val
    return "training data (no test set and val_fraction 0: accuracy is optimistic)", data.train


def _latency_example(split: TokenizedSplit, pad_id: int, tokens: int) -> TokenBatch:
    batch = collate(split, torch.tensor([len(split) - 1]), pad_id=pad_id)
    ids = torch.full((1, tokens), pad_id, dtype=torch.long)
    width = min(tokens, batch.input_ids.shape[1])
    ids[0, :width] = batch.input_ids[0, :width]
    ids[0, width:] = batch.input_ids[0, width - 1]  # real tokens throughout: padding would skip no work anyway
    type_ids = torch.zeros_like(ids) if batch.token_type_ids is not None else None
    return TokenBatch(ids, torch.ones_like(ids), type_ids)


def _evaluate(spec: JobSpec, data: TextData, models: dict[str, nn.Module], plan: StudentPlan, pad_id: int,
              runtime: Runtime, options: RunOptions, state: RunState) -> dict[str, Any]:
    split_name, split = _eval_split(data)
    batches = TokenBatches(split, pad_id=pad_id, device=runtime.device)
    labels = split.labels
    tokens = min(LATENCY_TOKENS, data.max_length)
    example = _latency_example(split, pad_id, tokens)
    keys = ["teacher", "student"] + (["baseline"] if spec.stages.baseline else [])
    logits: dict[str, torch.Tensor] = {}
    results: dict[str, Any] = {}
    for key in keys:
        model = models[key]
        if isinstance(model, TextClassifier):
            model.capture_hidden = False
        logits[key] = predict_text_logits(model, batches, runtime, spec.eval_batch_size)
        shipped = deployable(model).cpu()
        results[key] = {
            **classification_metrics(logits[key], labels, data.num_classes),
            "params": sum(p.numel() for p in shipped.parameters()),
            "size_mb": size_mb(shipped),
            "latency_ms": cpu_latency_ms(model.cpu(), example, runs=options.latency_runs),
        }
        model.to(runtime.device)
    student, teacher = results["student"], results["teacher"]
    results.update(
        task="text_classification",
        agreement=agreement(logits["student"], logits["teacher"]),
        compression=teacher["size_mb"] / max(student["size_mb"], 1e-9),
        speedup=teacher["latency_ms"] / max(student["latency_ms"], 1e-9),
        eval_split=split_name,
        eval_samples=len(labels),
        class_names=data.class_names,
        student_confusion=confusion_matrix(logits["student"], labels, data.num_classes),
        shared_parameters=state.info.get("shared_parameters", 0),
        student_description=state.info.get("student", plan.description),
        teacher_layers=state.info.get("teacher_layers"),
        latency_tokens=tokens,
        max_length=data.max_length,
        truncated=data.info["truncated"],
        disagreements=_disagreements(split, logits, data.class_names),
    )
    results["latency_runtime"] = "pytorch"
    if found := size_and_speed_warnings(teacher, student, "pytorch"):
        results["warnings"] = found
    if "baseline" in results:
        results.update(gain_over_baseline(correct(logits["student"], labels), correct(logits["baseline"], labels),
                                          seed=spec.seed))
    if spec.quantize == "dynamic_int8":
        quantized = image_export.quantize_dynamic_int8(deployable(models["student"]))
        wrapped = TextClassifier(quantized) if isinstance(models["student"], TextClassifier) else quantized
        cpu = Runtime(device=torch.device("cpu"), precision="fp32")
        int8_logits = predict_text_logits(wrapped, TokenBatches(split, pad_id=pad_id, device=cpu.device), cpu,
                                          spec.eval_batch_size)
        results["student_int8"] = {
            **classification_metrics(int8_logits, labels, data.num_classes),
            "params": student["params"],
            "size_mb": image_export.quantized_size_mb(quantized),
            "latency_ms": cpu_latency_ms(wrapped, example, runs=options.latency_runs),
        }
    return results


def _disagreements(split: TokenizedSplit, logits: dict[str, torch.Tensor], names: list[str]) -> list[dict[str, Any]]:
    teacher, student = logits["teacher"].argmax(1), logits["student"].argmax(1)
    rows = (teacher != student).nonzero().flatten().tolist()[:DISAGREEMENTS_SHOWN]
    return [{"text": split.texts[i][:300], "label": names[int(split.labels[i])], "teacher": names[int(teacher[i])],
             "student": names[int(student[i])]} for i in rows]


# --- export -----------------------------------------------------------------------------------------------


def _export(spec: JobSpec, data: TextData, models: dict[str, nn.Module], tokenizer: Any, plan: StudentPlan,
            options: RunOptions) -> list[Path]:
    out = options.out_dir
    student = models["student"].cpu().eval()
    shipped = deployable(student)
    metadata = {"task": "text_classification", "class_names": data.class_names, "max_length": data.max_length,
                "arch": spec.student.arch, "arch_args": spec.student.arch_args, "student": plan.description,
                "job_id": options.job_id}
    is_hf = isinstance(student, TextClassifier)
    artifacts = []
    if spec.stages.teacher_finetune_epochs:
        teacher = models["teacher"]
        assert isinstance(teacher, TextClassifier)
        artifacts.append(text_export.export_hf_zip(teacher.model.cpu(), tokenizer, out / "teacher_hf.zip",
                                                   {**metadata, "arch": "teacher"}))
    if "hf" in spec.export:
        if not is_hf:
            raise KDError("a text_bilstm student has no transformers folder: drop hf from export", field="export",
                          code="bad_input")
        artifacts.append(text_export.export_hf_zip(shipped, tokenizer, out / "student_hf.zip", metadata))
    if "safetensors" in spec.export:
        artifacts.append(text_export.export_safetensors(shipped, out / "student.safetensors", metadata))
    if "onnx" in spec.export:
        with_type_ids = is_hf and "token_type_ids" in tokenizer.model_input_names
        onnx_path = text_export.export_text_onnx(student, out / "student.onnx", vocab_size=len(tokenizer),
                                                 with_type_ids=with_type_ids)
        image_export.write_onnx_metadata(onnx_path, metadata)
        artifacts.append(onnx_path)
    return artifacts
