"""The staged pipeline of a causal language-model job (an hf ...ForCausalLM teacher), top to bottom.

check (data, tokenizer, memory estimate) → teacher fine-tune (hard labels, when asked) → the
teacher's targets: its top-K cache (`method.top_k`, reused by key without loading the teacher),
its written answers (`seq_kd`) or the teacher run live → distillation → student fine-tune →
baseline (the same student initialisation on the labels alone) → evaluation → export → report.
Checkpoints, resume, cancel and progress are those of every job.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from kdcore import text_export
from kdcore.architectures import HFArgs
from kdcore.callbacks import Callbacks, CancelOnly
from kdcore.checkpoint import Checkpointer, RunState
from kdcore.distributed import Group, join, leave, rank_device, rank_threads, report
from kdcore.errors import KDError
from kdcore.hf_models import HfFolder, StudentPlan, load_config, load_tokenizer, unpack_hf_zip
from kdcore.limits import GiB, ResourceLimits, check_parameters
from kdcore.lm_cache import TeacherTopKCache, cache_key, compute_top_k, file_sha256
from kdcore.lm_data import LMBatches, LMData, LMSplit, from_sequences, load_lm_data, with_answers
from kdcore.lm_evaluate import agreement, model_metrics, sample_prompts, sample_texts
from kdcore.lm_losses import LossSettings
from kdcore.lm_memory import check_memory_estimate, estimate_memory, teacher_bytes_per_parameter
from kdcore.lm_models import (
    CausalLM,
    build_lm_student,
    check_causal_family,
    generate,
    load_causal_lm,
    load_pretrained_lm_student,
    planned_student,
)
from kdcore.lm_trainer import CachedLMTeacher, LiveLMTeacher, LMTargets, LMTrainer, freeze
from kdcore.pipeline import (
    JobInputs,
    RunOptions,
    RunResult,
    announce,
    stage_finished,
    stage_plan,
    steps_done,
    write_reports,
)
from kdcore.runtime import Runtime, make_runtime, precision_warning, restore_rng, seed_everything, set_threads
from kdcore.sharding import (
    has_sharded,
    is_sharded,
    remove_stale,
    restore_shards,
    run_in_root,
    shard_model,
    teacher_bytes_bf16,
    teacher_should_shard,
    unshard,
)
from kdcore.spec import JobSpec
from kdcore.trainer import ProgressTracker

TEACHER = "teacher.file"


def run_lm_job(spec: JobSpec, inputs: JobInputs, options: RunOptions, callbacks: Callbacks) -> RunResult:
    if spec.distributed.nproc > 1 and spec.distributed.strategy == "fsdp" and spec.stages.teacher_finetune_epochs:
        raise KDError("fsdp does not fine-tune a causal_lm teacher yet: set stages.teacher_finetune_epochs to 0 "
                      "or use strategy ddp", field="distributed.strategy", code="bad_input")
    runtime = make_runtime(rank_device(spec.device), spec.precision)
    group = join(spec.distributed, runtime.device)
    set_threads(rank_threads(spec.threads, group, runtime.device))
    if not group.is_main:
        # One voice: rank 0 reports progress and writes the checkpoint, the shared cache, artifacts and report.
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


class TeacherLoader:
    """The teacher's weights, loaded the first time something needs them (a reused cache may mean never)."""

    def __init__(self, folder: HfFolder, tokenizer: Any, runtime: Runtime, *, trainable: bool) -> None:
        self.folder, self.tokenizer, self.runtime, self.trainable = folder, tokenizer, runtime, trainable
        self.model: CausalLM | None = None
        self.loads = 0
        self.sharded = False  # fsdp: it was over distributed.replicate_teacher_mb, so sharded for the distillation

    def get(self) -> CausalLM:
        if self.model is None:
            self.loads += 1
            # A frozen teacher in bf16 where the job runs in bf16: half the memory, and it only runs forward.
            frozen_bf16 = self.runtime.precision == "bf16" and not self.trainable
            dtype = torch.bfloat16 if frozen_bf16 else torch.float32
            model = load_causal_lm(self.folder, self.tokenizer, field=TEACHER, dtype=dtype)
            self.model = freeze(model.to(self.runtime.device))  # type: ignore[assignment]
        assert self.model is not None
        return self.model

    def release(self) -> None:
        """Free the teacher's memory once its cache holds all the student needs of it."""
        self.model = None

    @property
    def loaded(self) -> bool:
        return self.loads > 0


@dataclass
class Evaluation:
    """A model's numbers on the evaluation split, its top-1 predictions, its samples."""

    metrics: dict[str, Any]
    predictions: torch.Tensor
    samples: list[str]


def _run(spec: JobSpec, inputs: JobInputs, options: RunOptions, callbacks: Callbacks, runtime: Runtime,
         scratch: Path, group: Group) -> RunResult:
    announce(callbacks, "check")
    seed_everything(spec.seed)
    method = spec.method
    folder = unpack_hf_zip(inputs.teacher, scratch / "teacher", field=TEACHER)
    tokenizer = load_tokenizer(folder, field=TEACHER)
    config = load_config(folder, field=TEACHER)
    check_causal_family(config, field=TEACHER)
    vocab = len(tokenizer)
    data = load_lm_data(spec.data, train_path=inputs.train, test_path=inputs.test, tokenizer=tokenizer,
                        seed=spec.seed, seq_kd=method.name == "seq_kd")
    if data.kind == "prompt" and spec.stages.teacher_finetune_epochs:
        raise KDError("prompt-only rows have no answers to fine-tune the teacher on: set "
                      "stages.teacher_finetune_epochs to 0, or give prompt + completion rows",
                      field="stages.teacher_finetune_epochs", code="bad_input")
    pad_id = int(tokenizer.pad_token_id)
    callbacks.on_log(f"data ({data.kind}): {len(data.train)} train, {len(data.val) if data.val else 0} validation, "
                     f"{len(data.test) if data.test else 0} test sequences; {data.info['train_tokens']} training "
                     f"tokens; {data.info['truncated']} truncated to {data.max_length}")

    cache, cache_path = _find_cache(spec, inputs, options)
    if cache is not None and not cache.fits(data.train):
        callbacks.on_log("the cached teacher top-K does not fit this tokenisation of the data: computed again")
        cache = None
    cache_reused = cache is not None
    student_folder = None
    if spec.student.file is not None:
        if spec.student.arch_args or spec.student.teacher_layers:
            raise KDError("a pretrained student (student.file) is used as it is: drop arch_args and teacher_layers",
                          field="student.file", code="bad_input")
        student_folder = unpack_hf_zip(inputs.student or Path(spec.student.file), scratch / "student",
                                       field="student.file")
    teacher_needed = cache is None or spec.stages.teacher_finetune_epochs > 0
    memory = check_memory(spec, config, folder, student_folder, vocab, options.limits, teacher_needed=teacher_needed)
    callbacks.on_log(f"memory estimate: {memory['total_bytes'] / GiB:.2f} GiB")

    stages = stage_plan(spec)
    checkpointer = Checkpointer(options.checkpoints)
    state = (checkpointer.load() if options.resume else None) or RunState()
    resumed_from = (state.stage, state.epoch) if state.stage else None
    if state.stage:
        callbacks.on_log(f"resuming from the checkpoint after {state.stage} epoch {state.epoch}")
        callbacks.on_resume(state.stage, state.epoch)

    train = LMBatches(data.train, pad_id=pad_id, device=runtime.device)
    val = LMBatches(data.val, pad_id=pad_id, device=runtime.device) if data.val is not None else None
    trainer = LMTrainer(
        runtime=runtime, optim=spec.optim, train=train, val=val, batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size, seed=spec.seed, callbacks=callbacks, checkpointer=checkpointer,
        tracker=ProgressTracker(total_steps=0), progress_interval_s=options.progress_interval_s, group=group,
    )
    trainer.tracker.total_steps = sum(stage.epochs for stage in stages) * trainer.steps_per_epoch
    trainer.tracker.skip_to(steps_done(stages, state, trainer.steps_per_epoch))

    teachers = TeacherLoader(folder, tokenizer, runtime, trainable=spec.stages.teacher_finetune_epochs > 0)
    if "teacher" in state.models:
        teachers.get().load_state_dict(state.models["teacher"])
    hard = LossSettings(vocab=vocab)
    soft = LossSettings(divergence=method.divergence, beta=method.beta, temperature=method.temperature,
                        alpha=method.alpha, vocab=vocab)
    eval_name, eval_split = _eval_split(data)
    teacher_eval: Evaluation | None = _cached_eval(cache)
    models: dict[str, CausalLM] = {}
    plan: StudentPlan | None = None
    label_train = data.train
    if state.rng is not None:
        restore_rng(state.rng)
    for stage in stages:
        if stage.model_key != "teacher" and plan is None:
            # Built after the teacher's fine-tune: the layer copy takes the adapted teacher.
            plan = _students(spec, config, vocab, teachers, student_folder, tokenizer, state, models, trainer)
            if cache is not None and not spec.stages.teacher_finetune_epochs:
                teachers.release()  # read for the layer copy only: the cache holds the rest
            if state.rng is not None and any(s.name == state.stage and s.model_key != "teacher" for s in stages):
                restore_rng(state.rng)  # building a student reseeds; a later checkpoint holds the stream to go on with
        if method.name == "seq_kd" and stage.name != "teacher_finetune" and label_train is data.train:
            answers = _answers(spec, teachers, data.train, tokenizer, state, "train")
            label_train = with_answers(data.train, answers, data.max_length)
            if group.is_main:
                _write_answers(options.out_dir / "teacher_answers.jsonl", data.train, answers, tokenizer)
        if stage_finished(stage, stages, state):
            continue
        if stage.name == "teacher_finetune":
            teacher = teachers.get()
            teacher.requires_grad_(True)
            trainer.fit_lm(stage, teacher, train, state, hard)
            freeze(teacher)
        elif stage.name == "distill" and method.name != "seq_kd":
            # The ranks compute the teacher's top-K once between them; only rank 0 writes the shared file.
            targets, cache, teacher_eval = _distill_targets(spec, teachers, data, eval_split, cache,
                                                            cache_path if group.is_main else None,
                                                            teacher_eval, tokenizer, runtime, callbacks, group)
            trainer.fit_lm(stage, models["student"], train, state, soft, targets=targets)
        else:
            batches = LMBatches(label_train, pad_id=pad_id, device=runtime.device)
            trainer.fit_lm(stage, models[stage.model_key], batches, state, hard)
    assert plan is not None  # the spec requires a student stage
    teacher_layout = "sharded" if teachers.sharded else "replicated"
    if group.sharded:
        _gather_models(models, runtime, group)
        if teachers.model is not None and is_sharded(teachers.model):
            teachers.release()  # frozen, as loaded: rank 0 reads a plain one from the file if it needs it
    leave(group)  # training was the group's work; evaluation, exports and the report are rank 0's
    if not group.is_main:
        return RunResult(metrics={}, resumed_from=resumed_from)

    announce(callbacks, "evaluate", fraction=1.0)
    if method.name == "seq_kd" and not int(eval_split.label_counts().sum()):
        # Prompts alone: the (adapted) teacher's answers are the reference every model is scored against.
        eval_split = with_answers(eval_split, _answers(spec, teachers, eval_split, tokenizer, state, "eval"),
                                  data.max_length)
    if teacher_eval is None:
        teacher_eval = _evaluate(teachers.get(), eval_split, tokenizer, runtime, spec, params=folder.info.params)
    metrics = _metrics(spec, data, eval_name, eval_split, teacher_eval, models, tokenizer, runtime, plan, state)
    metrics["memory_estimate"] = memory
    if group.active:
        metrics["distributed"] = report(group, spec.distributed.strategy, spec.batch_size, runtime.device)
        if group.sharded:
            metrics["distributed"]["teacher"] = teacher_layout
    metrics["teacher_cache"] = _cache_report(spec, data, cache, cache_path, teachers, reused=cache_reused)
    announce(callbacks, "export", fraction=1.0)
    artifacts = _export(spec, models, teachers, tokenizer, plan, options)
    if (options.out_dir / "teacher_answers.jsonl").exists():
        artifacts.append(options.out_dir / "teacher_answers.jsonl")
    announce(callbacks, "report", fraction=1.0)
    source = f"{data.source} ({data.kind}): {len(data.train)} training sequences, {data.info['train_tokens']} tokens"
    artifacts += write_reports(spec, source, metrics, state, options)
    if not options.keep_checkpoint:
        checkpointer.clear()
        remove_stale(checkpointer.directory, None)
    return RunResult(metrics=metrics, artifacts=artifacts, resumed_from=resumed_from)


# --- the check: memory ---------------------------------------------------------------------------------


def check_memory(spec: JobSpec, config: Any, folder: HfFolder, student_folder: HfFolder | None, vocab: int,
                 limits: ResourceLimits, *, teacher_needed: bool) -> dict[str, int]:
    if student_folder is not None:
        student_params = student_folder.info.params
        hidden, layers = student_folder.info.hidden_size or 0, student_folder.info.num_layers or 0
    else:
        student, student_params = planned_student(config, HFArgs.model_validate(spec.student.arch_args),
                                                  spec.student.teacher_layers)
        hidden, layers = int(student.hidden_size), int(student.num_hidden_layers)
    check_parameters(student_params, limits, field="student.file" if student_folder else "student.arch_args")
    teacher_bytes = teacher_bytes_per_parameter(precision=spec.precision,
                                                teacher_finetune_epochs=spec.stages.teacher_finetune_epochs)
    memory = estimate_memory(teacher_params=folder.info.params if teacher_needed else 0, teacher_bytes=teacher_bytes,
                             student_params=student_params, hidden=hidden, layers=layers,
                             tokens_per_batch=spec.batch_size * spec.data.max_length, vocab=vocab,
                             gradient_checkpointing=spec.gradient_checkpointing)
    check_memory_estimate(memory, limits)
    return memory


# --- models ---------------------------------------------------------------------------------------------


def _students(spec: JobSpec, config: Any, vocab: int, teachers: TeacherLoader, student_folder: HfFolder | None,
              tokenizer: Any, state: RunState, models: dict[str, CausalLM], trainer: LMTrainer) -> StudentPlan:
    """Student and baseline from one initialisation (layer copy included), then their checkpointed weights."""
    if student_folder is not None:
        plan = load_pretrained_lm_student(student_folder, tokenizer)
    else:
        # Every model built here comes from the checkpoint: the teacher's layers need not be read.
        resumed = all(key in state.models or has_sharded(state.info, key)
                      for key in ("student", "baseline")[:1 + spec.stages.baseline])
        source = teachers.get().model if spec.student.init_from_teacher and not resumed else None
        plan = build_lm_student(config, HFArgs.model_validate(spec.student.arch_args), vocab=vocab, seed=spec.seed,
                                teacher=source, teacher_layers=spec.student.teacher_layers)
    assert isinstance(plan.model, CausalLM)
    if spec.gradient_checkpointing:
        _checkpointing(plan.model.model, "enable")()
    models.update(student=plan.model, baseline=copy.deepcopy(plan.model))
    device = teachers.runtime.device
    for key in ("student", "baseline"):
        if key in state.models:
            models[key].load_state_dict(state.models[key])
        models[key].to(device)
    restore_shards(["student", "baseline"], models, checkpoints=_checkpoints(trainer), info=state.info,
                   sharded=trainer.group.sharded, sharded_models=trainer.sharded_models, plain_weights=state.models)
    if "shared_parameters" not in state.info:
        state.info.update(shared_parameters=plan.shared_parameters, student=plan.description,
                          teacher_layers=plan.teacher_layers)
    return plan


def _checkpointing(model: Any, action: str) -> Any:
    """transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; either works here."""
    return getattr(model, f"activation_checkpointing_{action}", None) or getattr(model,
                                                                             f"gradient_checkpointing_{action}")


# --- the teacher's targets ------------------------------------------------------------------------------


def _find_cache(spec: JobSpec, inputs: JobInputs,
                options: RunOptions) -> tuple[TeacherTopKCache | None, Path | None]:
    """A shareable top-K cache's path, and the cache itself where an earlier job wrote it."""
    if not spec.method.top_k or spec.stages.teacher_finetune_epochs or options.lm_cache_dir is None:
        return None, None
    key = cache_key(spec, teacher_sha256=file_sha256(inputs.teacher), train_sha256=file_sha256(inputs.train),
                    test_sha256=file_sha256(inputs.test) if inputs.test is not None else None)
    path = options.lm_cache_dir / f"{key}.safetensors"
    return (TeacherTopKCache.load(path) if path.exists() else None), path


def _distill_targets(spec: JobSpec, teachers: TeacherLoader, data: LMData, eval_split: LMSplit,
                     cache: TeacherTopKCache | None, cache_path: Path | None, teacher_eval: Evaluation | None,
                     tokenizer: Any, runtime: Runtime, callbacks: Callbacks,
                     group: Group) -> tuple[LMTargets, TeacherTopKCache | None, Evaluation | None]:
    if not spec.method.top_k:
        return LiveLMTeacher(_shard_teacher(spec, teachers, callbacks, group), runtime), cache, teacher_eval
    if cache is not None:
        callbacks.on_log(f"teacher top-{cache.k} read from the cache: the teacher is not run")
        return CachedLMTeacher(cache, runtime.device), cache, teacher_eval
    announce(callbacks, "teacher_cache")
    teacher = _shard_teacher(spec, teachers, callbacks, group)
    cache = _split_top_k(teacher, data.train, spec, int(tokenizer.pad_token_id), runtime, group)
    if not is_sharded(teacher):
        # Everything a later job needs of the teacher goes with its top-K, so that job never loads it. A
        # sharded teacher is not evaluated here (generation is no collective): rank 0 loads it for that at the end.
        teacher_eval = _evaluate(teacher, eval_split, tokenizer, runtime, spec, params=teachers.folder.info.params)
        cache.teacher_eval = {"metrics": teacher_eval.metrics, "samples": teacher_eval.samples}
        cache.test_predictions = teacher_eval.predictions
    if cache_path is not None:
        cache.save(cache_path)
        callbacks.on_log(f"teacher top-{cache.k} cached as {cache_path.name}")
    if not spec.stages.teacher_finetune_epochs:
        teachers.release()  # the student trains with the teacher's memory free (it is exported only when adapted)
    return CachedLMTeacher(cache, runtime.device), cache, teacher_eval


def _shard_teacher(spec: JobSpec, teachers: TeacherLoader, callbacks: Callbacks, group: Group) -> CausalLM:
    """The frozen teacher, sharded under fsdp when its bf16 weights exceed distributed.replicate_teacher_mb."""
    teacher = teachers.get()
    if group.sharded and not is_sharded(teacher) and teacher_should_shard(teacher,
                                                                        spec.distributed.replicate_teacher_mb):
        callbacks.on_log(f"the teacher's {teacher_bytes_bf16(teacher) / 2**20:.0f} MB (bf16) exceed "
                         f"distributed.replicate_teacher_mb: it is sharded across the {group.world} ranks")
        shard_model(teacher)
        teachers.sharded = True
    return teacher


def _split_top_k(teacher: CausalLM, split: LMSplit, spec: JobSpec, pad_id: int, runtime: Runtime,
                 group: Group) -> TeacherTopKCache:
    """The teacher's top-K on the training split, computed once: rank r on its contiguous share of the
    sequences, the shares (a varying number of scored tokens each) joined in order on every rank.

    A sharded teacher's forward is a collective, so every rank then runs as many sequences: a shorter
    share repeats its last sequence up to the longest share's length, and the extra rows are dropped.
    """
    def top_k(part: LMSplit) -> TeacherTopKCache:
        return run_in_root(teacher, lambda: compute_top_k(teacher, part, k=int(spec.method.top_k or 0),
                                                          pad_id=pad_id, runtime=runtime,
                                                          batch_size=spec.eval_batch_size))

    if not group.active:
        return top_k(split)
    bounds = [len(split) * r // group.world for r in range(group.world + 1)]
    start, end = bounds[group.rank], bounds[group.rank + 1]
    extra = group.slice_width(len(split)) - (end - start) if is_sharded(teacher) else 0
    padding = [end - 1 if end > start else 0] * extra
    local = top_k(_pick(split, list(range(start, end)) + padding))
    if extra:
        rows = int(split.label_counts()[start:end].sum())
        local = TeacherTopKCache(type(local.top)(local.top.log_probs[:rows], local.top.ids[:rows],
                                                 local.top.tail[:rows]), local.offsets,
                                 forward_tokens=local.forward_tokens - int(split.lengths[padding].sum()))

    def joined(tensor: torch.Tensor) -> torch.Tensor:
        # float16 travels as float32 (exactly), on the device the backend wants.
        wide = tensor.float() if tensor.is_floating_point() else tensor
        return group.gather_ragged(wide.to(runtime.device)).cpu().to(tensor.dtype)

    top = type(local.top)(joined(local.top.log_probs), joined(local.top.ids), joined(local.top.tail))
    offsets = torch.zeros(len(split) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(split.label_counts(), 0)
    forward = group.sum_(torch.tensor([float(local.forward_tokens)], device=runtime.device))
    return TeacherTopKCache(top, offsets, forward_tokens=int(forward.item()))


def _pick(split: LMSplit, indices: list[int]) -> LMSplit:
    """The split's sequences at `indices` (in that order, repeats allowed), as a split of their own."""
    spans = [(int(split.offsets[i]), int(split.offsets[i + 1])) for i in indices]
    offsets = torch.zeros(len(indices) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([b - a for a, b in spans], dtype=torch.int64), 0)
    return LMSplit(torch.cat([split.tokens[:0]] + [split.tokens[a:b] for a, b in spans]),
                   torch.cat([split.targets[:0]] + [split.targets[a:b] for a, b in spans]), offsets,
                   split.prompt_lengths[torch.tensor(indices, dtype=torch.int64)], split.truncated)


def _checkpoints(trainer: LMTrainer) -> Path | None:
    return trainer.checkpointer.directory if trainer.checkpointer is not None else None


def _gather_models(models: dict[str, CausalLM], runtime: Runtime, group: Group) -> None:
    """After training: rank 0 gets a plain copy of every sharded model (a collective, on every rank)."""
    for key in sorted(models):
        if is_sharded(models[key]):
            plain = unshard(models[key], runtime.device, is_main=group.is_main)
            if plain is not None:
                assert isinstance(plain, CausalLM)
                if getattr(plain.model.config, "tie_word_embeddings", False):
                    plain.model.tie_weights()  # the gathered weights came as two tensors: one again
                models[key] = plain


def _cached_eval(cache: TeacherTopKCache | None) -> Evaluation | None:
    if cache is None or not cache.teacher_eval or cache.test_predictions is None:
        return None
    return Evaluation(cache.teacher_eval["metrics"], cache.test_predictions, cache.teacher_eval["samples"])


def _answers(spec: JobSpec, teachers: TeacherLoader, split: LMSplit, tokenizer: Any, state: RunState,
             name: str) -> list[list[int]]:
    """seq_kd: the teacher's answers to the split's prompts, once per job (kept in the checkpoint)."""
    key = f"teacher_answers_{name}"
    stored = state.info.get(key)
    if stored is not None:
        offsets = stored["offsets"].tolist()
        tokens = stored["tokens"].tolist()
        return [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    prompts = [split.sequence(i)[:int(split.prompt_lengths[i])] for i in range(len(split))]
    torch.manual_seed(spec.seed)  # sampled answers are part of the data: the same seed writes the same ones
    answers = generate(teachers.get(), prompts, max_new_tokens=spec.method.max_new_tokens,
                       sample=spec.method.sampling == "sample", tokenizer=tokenizer, batch_size=spec.eval_batch_size)
    packed = from_sequences([(answer, [True] * len(answer), 0) for answer in answers], truncated=0)
    state.info[key] = {"tokens": packed.tokens, "offsets": packed.offsets}
    return answers


def _write_answers(path: Path, split: LMSplit, answers: list[list[int]], tokenizer: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for index, answer in enumerate(answers):
            prompt = split.sequence(index)[:int(split.prompt_lengths[index])]
            handle.write(json.dumps({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                                     "completion": tokenizer.decode(answer, skip_special_tokens=True)}) + "\n")
    os.replace(temporary, path)


# --- evaluation -----------------------------------------------------------------------------------------


def _eval_split(data: LMData) -> tuple[str, LMSplit]:
    if data.test is not None:
        return "test split", data.test
    if data.val is not None:
        return "validation split (no test set was given)", data.val
    return "training data (no test set and val_fraction 0: the loss is optimistic)", data.train


def _evaluate(model: CausalLM, split: LMSplit, tokenizer: Any, runtime: Runtime, spec: JobSpec, *,
              params: int | None = None) -> Evaluation:
    metrics, predictions = model_metrics(model, split, tokenizer, runtime=runtime, batch_size=spec.eval_batch_size)
    if params is not None:
        metrics["params"] = params  # the teacher's file, not the padded copy in memory
    samples = sample_texts(model, sample_prompts(split), tokenizer)
    return Evaluation(metrics, predictions, samples)


def _metrics(spec: JobSpec, data: LMData, eval_name: str, split: LMSplit, teacher: Evaluation,
             models: dict[str, CausalLM], tokenizer: Any, runtime: Runtime, plan: StudentPlan,
             state: RunState) -> dict[str, Any]:
    keys = ["student"] + (["baseline"] if spec.stages.baseline else [])
    evaluations = {key: _evaluate(models[key], split, tokenizer, runtime, spec) for key in keys}
    student = evaluations["student"].metrics
    prompts = sample_prompts(split)
    samples = [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True), "teacher": teacher.samples[i],
                **{key: evaluation.samples[i] for key, evaluation in evaluations.items()}}
               for i, prompt in enumerate(prompts) if i < len(teacher.samples)]
    results: dict[str, Any] = {
        "task": "causal_lm",
        "teacher": teacher.metrics,
        **{key: evaluation.metrics for key, evaluation in evaluations.items()},
        "agreement": agreement(evaluations["student"].predictions, teacher.predictions),
        "compression": teacher.metrics["size_mb"] / max(student["size_mb"], 1e-9),
        "speedup": student["tokens_per_s"] / max(teacher.metrics["tokens_per_s"], 1e-9),
        "eval_split": eval_name,
        "eval_samples": len(split),
        "eval_tokens": int(split.label_counts().sum()),
        "samples": samples,
        "data_kind": data.kind,
        "method": {"name": spec.method.name, "divergence": spec.method.divergence, "top_k": spec.method.top_k,
                   "temperature": spec.method.temperature, "alpha": spec.method.alpha},
        "shared_parameters": state.info.get("shared_parameters", 0),
        "student_description": state.info.get("student", plan.description),
        "teacher_layers": state.info.get("teacher_layers"),
        "max_length": data.max_length,
        "truncated": data.info["truncated"],
    }
    if "baseline" in evaluations:
        results["baseline_agreement"] = agreement(evaluations["baseline"].predictions, teacher.predictions)
        # In nats per token, positive when distillation helped (a lower loss than the same student alone).
        results["distillation_gain"] = evaluations["baseline"].metrics["loss"] - student["loss"]
    return results


def _cache_report(spec: JobSpec, data: LMData, cache: TeacherTopKCache | None, cache_path: Path | None,
                  teachers: TeacherLoader, *, reused: bool) -> dict[str, Any]:
    """How much teacher compute the cache saved, in teacher forward tokens, against the teacher run live."""
    live = int(data.train.lengths.sum()) * spec.stages.distill_epochs if spec.method.name == "kd" else 0
    if cache is None:
        return {"used": False, "teacher_forward_tokens": live, "teacher_forward_tokens_saved": 0}
    ran = 0 if reused else cache.forward_tokens
    return {"used": True, "key": cache_path.stem if cache_path else None, "reused": reused,
            "top_k": cache.k, "rows": int(cache.top.ids.shape[0]), "teacher_forward_tokens": ran,
            "teacher_forward_tokens_saved": max(0, live - ran), "teacher_loaded": teachers.loaded}


# --- export ---------------------------------------------------------------------------------------------


def _export(spec: JobSpec, models: dict[str, CausalLM], teachers: TeacherLoader, tokenizer: Any, plan: StudentPlan,
            options: RunOptions) -> list[Path]:
    out = options.out_dir
    student = models["student"].cpu().eval()
    if spec.gradient_checkpointing:
        _checkpointing(student.model, "disable")()
    metadata = {"task": "causal_lm", "arch": spec.student.arch, "arch_args": spec.student.arch_args,
                "student": plan.description, "vocab": student.vocab, "max_length": spec.data.max_length}
    artifacts = []
    if spec.stages.teacher_finetune_epochs:
        artifacts.append(text_export.export_hf_zip(teachers.get().model.cpu(), tokenizer, out / "teacher_hf.zip",
                                                   {**metadata, "arch": "teacher"}))
    if "hf" in spec.export:
        artifacts.append(text_export.export_hf_zip(student.model, tokenizer, out / "student_hf.zip", metadata))
    if "safetensors" in spec.export:
        path = out / "student.safetensors"
        temporary = path.with_name(f".{path.name}.tmp")
        # save_model, not save_file: tied embeddings (GPT-2's head is its input embedding) are stored once.
        save_model(student.model, str(temporary), metadata={key: json.dumps(value) for key, value in metadata.items()})
        os.replace(temporary, path)
        artifacts.append(path)
    return artifacts
