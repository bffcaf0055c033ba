"""KD throughput: the Distillery engine against a hand-written PyTorch loop and torchdistill 1.1.5.

    .venv/bin/python bench/kd_throughput.py            # the default run (about 10 minutes on 2 cores)
    .venv/bin/python bench/kd_throughput.py --quick    # one round, one epoch each (about 2-3 minutes)
    .venv/bin/python bench/kd_throughput.py --device cuda --pairs mlp cnn   # on a GPU (bf16 rows matter there)

Needs ../shared/data/mnist.npz (skips with a message where it is absent) and, for the torchdistill
rows, `pip install torchdistill==1.1.5` (the `bench` extra; rows are skipped without it).

Two kinds of measurement:
* separate processes: every variant in its own subprocess (a fresh allocator, its own peak RSS
  from /proc/self/status VmHWM), one after another, the whole set repeated `--rounds` times with
  the order rotated each round; ratios are taken inside each round, medians over rounds.
* one process, round robin (`--ab-rounds`): the engine's Trainer, the hand loop and torchdistill
  each train their own student, one epoch per side in turn, so outside load on a shared machine
  hits every side alike; per-round ratios and their median.

Variants (same model, data on the same device, batch size, seed, AdamW + cosine per step, no
validation, MNIST train split of 60,000 images; the CNN pair uses its first --cnn-train images):
* engine kd:   `kdcore.pipeline.run_job` (the whole job; teacher logits cached once as fp16); the
               epochs are timed by the engine's own per-epoch clock (history.csv `train_time_s`,
               which covers the training steps of an epoch, not validation or the checkpoint).
* engine ce:   the same job with only the hard-label stage (`distill_epochs: 0, finetune_epochs: E`),
               i.e. training the student alone through the engine.
* hand kd:     a minimal PyTorch loop: float inputs prepared once, teacher logits cached once,
               Hinton's loss written out, AdamW, LambdaLR cosine.
* hand ce:     the same loop with cross-entropy only (the student alone).
* hand kd-live: the hand loop running the teacher under no_grad every step (what torchdistill does).
* torchdistill kd: `DistillationBox` configured through its registries (WeightedSumLoss of one
               KDLoss term, AdamW, CosineAnnealingLR stepped per iteration, a DataLoader over a
               TensorDataset of the prepared float inputs, num_workers 0); no teacher cache exists there.
               Its KDLoss `alpha` weights the CE term, so ours (soft weight 0.9) is its alpha 0.1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist.npz"
CACHE = ROOT / "runs" / "kd_throughput"

PAIRS: dict[str, dict[str, Any]] = {
    "mlp": {
        "label": "MLP 784-1200-1200-10 -> 784-800-800-10",
        "teacher": ("mlp", {"hidden": [1200, 1200], "dropout": 0.5}),
        "student": ("mlp", {"hidden": [800, 800]}),
        "teacher_epochs": 3,
    },
    "cnn": {
        "label": "CNN cnn[32,64] -> cnn[16,32]",
        "teacher": ("cnn", {"widths": [32, 64]}),
        "student": ("cnn", {"widths": [16, 32]}),
        "teacher_epochs": 2,
    },
}
TEMPERATURE = 4.0
ALPHA = 0.9  # weight of the soft term (Distillery's convention)
BATCH = 128
LR = 1e-3

# (runner, work) at each precision: what one subprocess measures.
FP32_VARIANTS = [("engine", "kd"), ("hand", "kd"), ("engine", "ce"), ("hand", "ce"), ("hand", "kd-live"),
                 ("torchdistill", "kd")]
BF16_VARIANTS = [("engine", "kd"), ("hand", "kd"), ("engine", "ce"), ("hand", "ce"), ("torchdistill", "kd")]


# ------------------------------------------------------------------------------------- worker


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that over fork and exec, so a
    worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_arrays(npz: Path, device: Any) -> tuple[Any, Any, Any, Any]:
    """Float inputs in [0, 1] (the engine's default normalisation), prepared once, as a user would."""
    import numpy as np
    import torch

    with np.load(npz) as data:
        x = torch.from_numpy(data["x_train"]).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(data["y_train"]).long()
        x_test = torch.from_numpy(data["x_test"]).float().div_(255.0).unsqueeze(1)
        y_test = torch.from_numpy(data["y_test"]).long()
    return x.to(device), y.to(device), x_test.to(device), y_test.to(device)


def _load_teacher(job: dict[str, Any], device: Any) -> Any:
    from safetensors.torch import load_file

    from kdcore.models import build_model

    arch, args = job["teacher_arch"]
    teacher = build_model(arch, args, (1, 28, 28), 10)
    teacher.load_state_dict(load_file(job["teacher_file"]))
    return teacher.to(device).eval().requires_grad_(False)


def _student(job: dict[str, Any], device: Any) -> Any:
    import torch

    from kdcore.models import build_model

    torch.manual_seed(job["seed"])
    arch, args = job["student_arch"]
    return build_model(arch, args, (1, 28, 28), 10).to(device)


def _accuracy(model: Any, x: Any, y: Any, autocast: Any) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), 1024):
            with autocast():
                logits = model(x[start:start + 1024]).float()
            correct += int((logits.argmax(1) == y[start:start + 1024]).sum())
    return correct / len(y)


def _autocast_factory(device: Any, precision: str) -> Any:
    import contextlib

    import torch

    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _steps(n: int) -> int:
    from kdcore.trainer import steps_per_epoch

    return steps_per_epoch(n, BATCH)  # as the engine: a last batch of one sample is dropped


def run_engine(job: dict[str, Any]) -> dict[str, Any]:
    import csv

    from kdcore.callbacks import Callbacks, Progress
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import parse_spec

    epochs = job["epochs"]
    stages = {"distill_epochs": epochs} if job["work"] == "kd" else {"distill_epochs": 0, "finetune_epochs": epochs}
    t_arch, t_args = job["teacher_arch"]
    s_arch, s_args = job["student_arch"]
    spec = parse_spec({
        "teacher": {"file": job["teacher_file"], "format": "safetensors", "arch": t_arch, "arch_args": t_args},
        "student": {"arch": s_arch, "arch_args": s_args},
        "data": {"train": job["data"], "val_fraction": 0.0},
        "method": {"name": "kd", "temperature": TEMPERATURE, "alpha": ALPHA},
        "stages": stages,
        "optim": {"name": "adamw", "lr": LR, "schedule": "cosine"},
        "batch_size": BATCH, "seed": job["seed"], "device": job["device"], "precision": job["precision"],
        "threads": job["threads"], "export": [],
    })

    class Clock(Callbacks):
        def __init__(self) -> None:
            self.stage_start: dict[str, float] = {}
            self.epoch_ends: list[float] = []
            self.peak_rss_mb = 0.0
            self.rss_before_mb = 0.0

        def on_stage_start(self, stage: str, epochs: int) -> None:
            self.stage_start.setdefault(stage, time.perf_counter())
            if stage in ("distill", "finetune"):
                self.rss_before_mb = _rss_now_mb()

        def on_epoch_end(self, progress: Progress) -> None:
            self.epoch_ends.append(time.perf_counter())
            self.peak_rss_mb = _peak_rss_mb()  # the peak so far, before evaluation and reports run

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        result = run_job(spec, JobInputs(teacher=Path(job["teacher_file"]), train=Path(job["data"])),
                         RunOptions(out_dir=Path(out), latency_runs=1, progress_interval_s=1e9), clock)
        with (Path(out) / "history.csv").open() as handle:
            times = [float(row["train_time_s"]) for row in csv.DictReader(handle)]
    stage = "distill" if job["work"] == "kd" else "finetune"
    cache_s = clock.stage_start["distill"] - clock.stage_start["teacher_cache"] if job["work"] == "kd" else 0.0
    ends = [clock.stage_start[stage], *clock.epoch_ends]
    with_checkpoint = [b - a for a, b in itertools.pairwise(ends)]
    return {"epoch_times": times, "epoch_times_with_checkpoint": with_checkpoint, "setup_s": cache_s,
            "accuracy": result.metrics["student"]["accuracy"], "peak_rss_mb": clock.peak_rss_mb,
            "rss_before_mb": clock.rss_before_mb}


def _kd(student_logits: Any, teacher_logits: Any, labels: Any) -> Any:
    import torch.nn.functional as F

    t = TEMPERATURE
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t
    return ALPHA * soft + (1 - ALPHA) * F.cross_entropy(student_logits, labels)


def run_hand(job: dict[str, Any]) -> dict[str, Any]:
    """The minimal loop a practitioner writes, doing the engine's work step for step."""
    import torch

    device, autocast, (x, y, x_test, y_test), teacher, model = _setup(job)
    epochs, steps = job["epochs"], _steps(len(x))

    started = time.perf_counter()
    cached = None
    if job["work"] == "kd":
        with torch.inference_mode(), autocast():
            cached = torch.cat([teacher(x[i:i + 1024]).float() for i in range(0, len(x), 1024)])
        cached = cached.clone()  # a normal tensor, not an inference-mode one
    _sync(device)
    setup_s = time.perf_counter() - started

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    total = epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1, step / total))))
    generator = torch.Generator().manual_seed(job["seed"])
    rss_before = _rss_now_mb()
    times = []
    for _ in range(epochs):
        _sync(device)
        started = time.perf_counter()
        _hand_epoch(model, x, y, cached, job["work"], optimizer, scheduler, generator, autocast, teacher)
        _sync(device)
        times.append(time.perf_counter() - started)
    peak = _peak_rss_mb()
    return {"epoch_times": times, "setup_s": setup_s, "accuracy": _accuracy(model, x_test, y_test, autocast),
            "peak_rss_mb": peak, "rss_before_mb": rss_before}


def _setup(job: dict[str, Any]) -> tuple[Any, Any, tuple[Any, Any, Any, Any], Any, Any]:
    """What every side of a job starts from: device, autocast, the arrays, the teacher and a fresh student."""
    import torch

    device = torch.device(job["device_resolved"])
    autocast = _autocast_factory(device, job["precision"])
    arrays = _load_arrays(Path(job["data"]), device)
    return device, autocast, arrays, _load_teacher(job, device), _student(job, device)


def _hand_epoch(model: Any, x: Any, y: Any, cached: Any, work: str, optimizer: Any, scheduler: Any,
                generator: Any, autocast: Any, teacher: Any = None) -> None:
    """One epoch of the hand-written loop: `ce` on labels, `kd` on cached teacher logits, `kd-live` runs the teacher."""
    import torch
    import torch.nn.functional as F

    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for step in range(_steps(len(x))):
        index = order[step * BATCH:(step + 1) * BATCH]
        inputs, labels = x[index], y[index]
        with autocast():
            logits = model(inputs)
        logits = logits.float()
        if work == "ce":
            loss = F.cross_entropy(logits, labels)
        elif work == "kd":
            loss = _kd(logits, cached[index], labels)
        else:  # kd-live
            with torch.no_grad(), autocast():
                teacher_logits = teacher(inputs)
            loss = _kd(logits, teacher_logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def _torchdistill_box(teacher: Any, model: Any, x: Any, y: Any, epochs: int, device: Any) -> Any:
    """A DistillationBox configured through torchdistill's registries to do our job's work."""
    import logging

    from torch.utils.data import RandomSampler, TensorDataset
    from torchdistill.core.distillation import DistillationBox

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    steps = math.ceil(len(x) / BATCH)
    # Its DataLoader is the usual kind: samples collated one by one, so the inputs live on the CPU.
    dataset = TensorDataset(x.cpu(), y.cpu())
    io = {"sequential": [], "forward_hook": {"input": [], "output": []}, "wrapper": None,
          "forward_proc": "forward_batch_only"}
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": BATCH, "num_workers": 0, "pin_memory": device.type == "cuda"}},
        "teacher": {**io, "requires_grad": False},
        "student": {**io, "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": LR, "weight_decay": 0.0}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": epochs * steps, "eta_min": 0.0},
                      "scheduling_step": 1},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                # torchdistill's alpha weights the CE term: ours (soft weight 0.9) is its 0.1.
                "temperature": TEMPERATURE, "alpha": 1.0 - ALPHA, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = DistillationBox(teacher, model, {"train": dataset}, train_config, device, None, False, 1)
    teacher.eval()  # torchdistill puts only the student in train mode; the teacher must not drop out
    return box


def _torchdistill_epoch(box: Any, epoch: int, device: Any, autocast: Any) -> None:
    box.pre_epoch_process(epoch=epoch)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        with autocast():
            loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
    box.post_epoch_process()


def run_ab(job: dict[str, Any]) -> dict[str, Any]:
    """Every side in one process, one epoch each in turn (order rotated every round).

    Sides: the engine's Trainer doing kd (cached teacher) and ce, the hand loop doing the same two,
    and torchdistill doing kd when it is installed. The engine side is set up as run_job sets it up
    (uint8 data on the device, Preprocess per batch, TeacherLogitsCache, the spec's loss, optimiser
    and scheduler) and driven through `Trainer._train_epoch`, the body of `Trainer.fit` without
    the checkpoint. Alternating epoch by epoch puts every side under the same load, which separate
    processes on a busy machine do not.
    """
    import importlib.util

    import numpy as np
    import torch

    from kdcore.callbacks import Callbacks
    from kdcore.data import Preprocess
    from kdcore.losses import build_distill_loss, cross_entropy_loss
    from kdcore.runtime import Runtime
    from kdcore.spec import MethodSpec, OptimSpec
    from kdcore.teacher_cache import TeacherLogitsCache
    from kdcore.trainer import DeviceData, ProgressTracker, Stage, Trainer, build_optimizer, build_scheduler

    device = torch.device(job["device_resolved"])
    autocast = _autocast_factory(device, job["precision"])
    rounds = job["ab_rounds"]
    with np.load(job["data"]) as data:
        x_stored = torch.from_numpy(data["x_train"]).unsqueeze(1).to(device)
        y = torch.from_numpy(data["y_train"]).long().to(device)
    _, _, x_test, y_test = _load_arrays(Path(job["data"]), device)
    teacher = _load_teacher(job, device)
    steps = _steps(len(y))
    total = rounds * steps

    runtime = Runtime(device=device, precision=job["precision"])
    optim = OptimSpec(name="adamw", lr=LR, schedule="cosine")
    preprocess = Preprocess([0.0], [1.0], (1, 28, 28)).to(device)
    trainer = Trainer(runtime=runtime, optim=optim, train=DeviceData(x_stored, y), val=None, preprocess=preprocess,
                      augment=None, batch_size=BATCH, eval_batch_size=1024, seed=job["seed"], callbacks=Callbacks(),
                      checkpointer=None, tracker=ProgressTracker(total_steps=2 * total), progress_interval_s=1e9)
    cache = TeacherLogitsCache.compute(teacher, x_stored, preprocess=preprocess, runtime=runtime, batch_size=1024)
    x = x_stored.float().div(255.0)
    with torch.inference_mode(), autocast():
        cached = torch.cat([teacher(x[i:i + 1024]).float() for i in range(0, len(x), 1024)]).clone()

    models: dict[str, Any] = {}
    sides: dict[str, Any] = {}
    for work in ("kd", "ce"):
        model = models[f"engine {work}"] = _student(job, device)
        optimizer = build_optimizer(optim, model, LR)
        scheduler = build_scheduler(optim, optimizer, total)
        stage = Stage("distill" if work == "kd" else "finetune", "student", rounds, LR, 1)
        loss_fn = build_distill_loss(MethodSpec(name="kd", temperature=TEMPERATURE, alpha=ALPHA)) \
            if work == "kd" else cross_entropy_loss
        shuffle = torch.Generator().manual_seed(job["seed"])
        sides[f"engine {work}"] = (lambda epoch, m=model, o=optimizer, sc=scheduler, st=stage, lf=loss_fn, sh=shuffle,
                                   t=(cache if work == "kd" else None):
                                   trainer._train_epoch(st, epoch, m, lf, o, sc, None, sh, t))
    for work in ("kd", "ce"):
        model = models[f"hand {work}"] = _student(job, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1, step / total))))
        generator = torch.Generator().manual_seed(job["seed"])
        sides[f"hand {work}"] = (lambda epoch, m=model, o=optimizer, sc=scheduler, g=generator, w=work:
                                 _hand_epoch(m, x, y, cached, w, o, sc, g, autocast))
    if job.get("torchdistill", True) and importlib.util.find_spec("torchdistill") is not None:
        model = models["torchdistill kd"] = _student(job, device)
        box = _torchdistill_box(teacher, model, x, y, rounds, device)
        sides["torchdistill kd"] = lambda epoch, b=box: _torchdistill_epoch(b, epoch, device, autocast)

    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for epoch in range(rounds):
        shift = epoch % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            started = time.perf_counter()
            sides[name](epoch)
            _sync(device)
            times[name].append(time.perf_counter() - started)
    accuracy = {name: _accuracy(model, x_test, y_test, autocast) for name, model in models.items()}
    return {"times": times, "accuracy": accuracy, "n_train": len(y)}


def run_torchdistill(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    device, autocast, (x, y, x_test, y_test), teacher, model = _setup(job)
    torch.manual_seed(job["seed"])
    box = _torchdistill_box(teacher, model, x, y, job["epochs"], device)
    rss_before = _rss_now_mb()
    times = []
    for epoch in range(job["epochs"]):
        _sync(device)
        started = time.perf_counter()
        _torchdistill_epoch(box, epoch, device, autocast)
        _sync(device)
        times.append(time.perf_counter() - started)
    peak = _peak_rss_mb()
    return {"epoch_times": times, "setup_s": 0.0, "accuracy": _accuracy(model, x_test, y_test, autocast),
            "peak_rss_mb": peak, "rss_before_mb": rss_before}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device_resolved"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runners = {"engine": run_engine, "hand": run_hand, "torchdistill": run_torchdistill, "ab": run_ab}
    result = runners[job["runner"]](job)
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ------------------------------------------------------------------------------------- parent


def _train_teacher(pair: dict[str, Any], npz: Path, path: Path, device: str, threads: int) -> None:
    """A quickly trained teacher (bf16, +-2 px jitter) so the accuracy comparison means something."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from kdcore.augment import shift
    from kdcore.models import build_model

    torch.set_num_threads(threads)
    dev = torch.device(device)
    x, y, x_test, y_test = _load_arrays(npz, dev)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    arch, args = pair["teacher"]
    model = build_model(arch, args, (1, 28, 28), 10).to(dev)
    epochs, steps = pair["teacher_epochs"], _steps(len(x))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * steps)
    autocast = _autocast_factory(dev, "bf16")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator).to(dev)
        for step in range(steps):
            index = order[step * BATCH:(step + 1) * BATCH]
            inputs = shift(x[index], generator)
            with autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    accuracy = _accuracy(model, x_test, y_test, autocast)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    print(f"  teacher {arch} {args}: {epochs} epochs, test accuracy {accuracy:.4f} -> {path.relative_to(ROOT)}",
          flush=True)


def _arch_tag(pair: dict[str, Any]) -> str:
    """A short hash of the teacher's parameter shapes, so a changed registry builder trains a new teacher."""
    import hashlib

    from kdcore.models import build_model

    arch, args = pair["teacher"]
    shapes = [(k, tuple(v.shape)) for k, v in build_model(arch, args, (1, 28, 28), 10).state_dict().items()]
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:8]


def _subset_npz(n: int) -> Path:
    import numpy as np

    path = CACHE / f"mnist_first{n}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with np.load(DATA) as data:
            np.savez(path, x_train=data["x_train"][:n], y_train=data["y_train"][:n],
                     x_test=data["x_test"], y_test=data["y_test"])
    return path


def _measure(job: dict[str, Any]) -> dict[str, Any]:
    # The repository first, then whatever the caller put on the path (packages installed beside it).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{job['runner']} {job['work']} {job['precision']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _samples_per_s(n: int, epoch_times: list[float]) -> float:
    # The first epoch of a fresh process pays one-off costs (allocator growth, kernel selection):
    # with two or more epochs it is left out.
    timed = epoch_times[1:] if len(epoch_times) > 1 else epoch_times
    return n * len(timed) / sum(timed)


def _key(runner: str, work: str, precision: str) -> str:
    return f"{runner} {work} {precision}"


def run_pair(name: str, args: argparse.Namespace, have_torchdistill: bool) -> dict[str, Any]:
    pair = PAIRS[name]
    limit = args.mlp_train if name == "mlp" else args.cnn_train
    npz = DATA if limit >= 60000 else _subset_npz(limit)
    import numpy as np

    with np.load(npz) as data:
        n_train = len(data["y_train"])
    device = args.device_resolved
    teacher_file = CACHE / f"teacher_{name}_{n_train}_{pair['teacher_epochs']}ep_{_arch_tag(pair)}.safetensors"
    if not teacher_file.exists():
        _train_teacher(pair, npz, teacher_file, device, args.threads)
    variants = [(r, w, "fp32") for r, w in FP32_VARIANTS] + [(r, w, "bf16") for r, w in BF16_VARIANTS]
    if args.no_bf16:
        variants = [v for v in variants if v[2] != "bf16"]
    if not have_torchdistill:
        variants = [v for v in variants if v[0] != "torchdistill"]
    epochs = args.epochs if name == "mlp" else args.cnn_epochs
    runs: dict[str, list[dict[str, Any]]] = {_key(*v): [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for runner, work, precision in variants[shift:] + variants[:shift]:
            job = {"runner": runner, "work": work, "precision": precision, "epochs": epochs, "seed": 0,
                   "threads": args.threads, "device": args.device, "device_resolved": device,
                   "data": str(npz), "teacher_file": str(teacher_file),
                   "teacher_arch": pair["teacher"], "student_arch": pair["student"]}
            result = _measure(job)
            result["samples_per_s"] = _samples_per_s(n_train, result["epoch_times"])
            runs[_key(runner, work, precision)].append(result)
            print(f"  [{name} round {round_index + 1}/{args.rounds}] {runner:12s} {work:7s} {precision}: "
                  f"{result['samples_per_s']:8.0f} samples/s, test acc {result['accuracy']:.4f}, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    ab: dict[str, dict[str, Any]] = {}
    if args.ab_rounds > 1:
        for precision in ("fp32", "bf16"):
            if args.no_bf16 and precision == "bf16":
                continue
            job = {"runner": "ab", "precision": precision, "ab_rounds": args.ab_rounds, "seed": 0,
                   "threads": args.threads, "device": args.device, "device_resolved": device,
                   "data": str(npz), "teacher_file": str(teacher_file), "torchdistill": have_torchdistill,
                   "teacher_arch": pair["teacher"], "student_arch": pair["student"]}
            result = ab[precision] = _measure(job)
            for side, times in result["times"].items():
                print(f"  [{name} in-process, {precision}] {side:16s} s/epoch "
                      f"{', '.join(f'{t:.2f}' for t in times)}; test acc {result['accuracy'][side]:.4f}", flush=True)
    return {"name": name, "label": pair["label"], "n_train": n_train, "epochs": epochs, "runs": runs, "ab": ab}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _paired(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> float | None:
    """Median over rounds of samples/s(a) / samples/s(b), each ratio taken within one round."""
    if a not in runs or b not in runs:
        return None
    return _median([x["samples_per_s"] / y["samples_per_s"] for x, y in zip(runs[a], runs[b], strict=False)])


def report(pairs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"device {args.device_resolved}, {args.threads} threads, batch {BATCH}, T={TEMPERATURE:g}, "
             f"alpha={ALPHA} (soft), AdamW lr {LR} cosine; {args.rounds} round(s), medians over rounds", ""]
    cuda = args.device_resolved.startswith("cuda")
    for pair in pairs:
        runs = {key: results for key, results in pair["runs"].items() if results}
        if not runs:
            lines += [f"### {pair['label']}: {pair['n_train']} train images", "", *_ab_lines(pair)]
            continue
        lines += [f"### {pair['label']}: {pair['n_train']} train images, {pair['epochs']} epochs per measurement", "",
                  "| runner | work | precision | samples/s | s/epoch | one-off s | test acc | peak RSS MB | "
                  "RSS growth in training MB" + (" | peak CUDA MB |" if cuda else " |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- | ---" + (" | --- |" if cuda else " |")]
        for key, results in runs.items():
            runner, work, precision = key.split(" ")
            sps = _median([r["samples_per_s"] for r in results])
            one_off = _median([r["setup_s"] for r in results])
            acc = _median([r["accuracy"] for r in results])
            rss = max(r["peak_rss_mb"] for r in results)
            growth = _median([max(0.0, r["peak_rss_mb"] - r["rss_before_mb"]) for r in results])
            extra = f" {max(r.get('peak_cuda_mb', 0) for r in results):.0f} |" if cuda else ""
            lines.append(f"| {runner} | {work} | {precision} | {sps:.0f} | {pair['n_train'] / sps:.2f} | "
                         f"{one_off:.2f} | {acc:.4f} | {rss:.0f} | {growth:.0f} |{extra}")
        lines.append("")
        checks = []
        for precision in ("fp32", "bf16"):
            engine_hand = _paired(runs, f"engine kd {precision}", f"hand kd {precision}")
            if engine_hand is not None:
                checks.append(f"engine / hand loop, kd {precision}: {engine_hand:.3f} of the hand loop's samples/s "
                              f"(target >= 0.95: {'met' if engine_hand >= 0.95 else 'NOT met'})")
            engine_ce = _paired(runs, f"engine kd {precision}", f"engine ce {precision}")
            if engine_ce is not None:
                cost = 1 / engine_ce
                cache = _median([r["setup_s"] for r in runs[f"engine kd {precision}"]])
                ce_epoch = pair["n_train"] / _median([r["samples_per_s"] for r in runs[f"engine ce {precision}"]])
                cost10 = cost + cache / (10 * ce_epoch)
                checks.append(f"engine kd (cached) / engine ce, {precision}: {cost:.3f}x the cost per epoch, "
                              f"{cost10:.3f}x over a 10-epoch job with the one teacher pass "
                              f"(target <= 1.10: {'met' if cost10 <= 1.10 else 'NOT met'})")
            hand_ce = _paired(runs, f"hand kd {precision}", f"hand ce {precision}")
            if hand_ce is not None:
                checks.append(f"hand kd (cached) / hand ce, {precision}: {1 / hand_ce:.3f}x the cost per epoch")
            td = _paired(runs, f"engine kd {precision}", f"torchdistill kd {precision}")
            if td is not None:
                acc_engine = _median([r["accuracy"] for r in runs[f"engine kd {precision}"]])
                acc_td = _median([r["accuracy"] for r in runs[f"torchdistill kd {precision}"]])
                target = " (target >= 1.4 on the MLP pair: " + ("met" if td >= 1.4 else "NOT met") + ")" \
                    if pair["name"] == "mlp" else ""
                checks.append(f"engine / torchdistill, kd {precision}: {td:.2f}x the samples/s{target}; "
                              f"test accuracy {acc_engine:.4f} vs {acc_td:.4f} ({(acc_engine - acc_td) * 100:+.2f} pp)")
            live = _paired(runs, f"hand kd-live {precision}", f"torchdistill kd {precision}")
            if live is not None:
                checks.append(f"hand loop with a live teacher / torchdistill, {precision}: {live:.2f}x "
                              "(the framework's own overhead, same work)")
        bf16 = _paired(runs, "engine kd bf16", "engine kd fp32")
        if bf16 is not None:
            checks.append(f"engine kd bf16 / fp32: {bf16:.2f}x the samples/s")
        lines += [f"- {check}" for check in checks] + [""] + _ab_lines(pair)
    return "\n".join(lines)


AB_RATIOS = [
    # (label, numerator side, denominator side, how the ratio reads, target check)
    ("engine / hand loop, kd", "engine kd", "hand kd", "samples/s", lambda r: r >= 0.95, ">= 0.95"),
    ("engine / hand loop, ce", "engine ce", "hand ce", "samples/s", lambda r: r >= 0.95, ">= 0.95"),
    ("engine kd (cached) cost / engine ce cost", "engine ce", "engine kd", "cost per epoch",
     lambda r: r <= 1.10, "<= 1.10"),
    ("hand kd (cached) cost / hand ce cost", "hand ce", "hand kd", "cost per epoch", None, ""),
    ("engine / torchdistill, kd", "engine kd", "torchdistill kd", "samples/s", lambda r: r >= 1.4, ">= 1.4"),
]


def _ab_ratios(result: dict[str, Any]) -> dict[str, tuple[float, list[float]]]:
    """Per-round ratios (first round left out: one-off costs) and their median."""
    times = result["times"]
    out = {}
    for label, a, b, _, _, _ in AB_RATIOS:
        if a in times and b in times:
            # samples/s(a) / samples/s(b) = time(b) / time(a); cost(b) / cost(a) likewise.
            ratios = [tb / ta for ta, tb in zip(times[a][1:], times[b][1:], strict=True)]
            out[label] = (_median(ratios), ratios)
    return out


def _ab_lines(pair: dict[str, Any]) -> list[str]:
    if not pair.get("ab"):
        return []
    lines = []
    for precision, result in pair["ab"].items():
        times = result["times"]
        lines += [f"In one process, one epoch per side in turn ({precision}, {len(next(iter(times.values())))} "
                  "epochs each, order rotated; the first round is left out of the medians):", "",
                  "| side | median s/epoch | samples/s | test acc after these epochs |", "| --- | --- | --- | --- |"]
        for side, values in times.items():
            median = _median(values[1:] if len(values) > 1 else values)
            lines.append(f"| {side} | {median:.2f} | {result['n_train'] / median:.0f} | "
                         f"{result['accuracy'][side]:.4f} |")
        lines.append("")
        ratios = _ab_ratios(result)
        for label, _, _, unit, check, target in AB_RATIOS:
            if label not in ratios:
                continue
            median, values = ratios[label]
            verdict = "" if check is None else f"; target {target}: {'met' if check(median) else 'NOT met'}"
            lines.append(f"- {label} ({unit}): median {median:.3f} "
                         f"(rounds: {', '.join(f'{v:.3f}' for v in values)}){verdict}")
        lines.append("")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", nargs="+", default=["mlp", "cnn"], choices=sorted(PAIRS))
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of the whole set, order rotated")
    parser.add_argument("--ab-rounds", type=int, default=4,
                        help="epochs of each side in the in-process round robin (0 or 1: skip it)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per MLP measurement (the first is left out)")
    parser.add_argument("--cnn-epochs", type=int, default=2, help="epochs per CNN measurement")
    parser.add_argument("--mlp-train", type=int, default=60000, help="training images for the MLP pair")
    parser.add_argument("--cnn-train", type=int, default=6000, help="training images for the CNN pair")
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 rows only")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 epoch each, CNN on 5,000 images")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.cnn_epochs, args.cnn_train, args.ab_rounds = 1, 1, 1, 5000, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} is not here (the real MNIST of ../shared/data; see its README)")
        return 0
    import importlib.util

    import torch

    args.device_resolved = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if args.device_resolved == "auto":
        args.device_resolved = "cpu"
    have_torchdistill = importlib.util.find_spec("torchdistill") is not None
    if not have_torchdistill:
        print("torchdistill is not installed (pip install torchdistill==1.1.5): its rows are skipped")
    started = time.monotonic()
    pairs = []
    for name in args.pairs:
        print(f"{PAIRS[name]['label']}:", flush=True)
        pairs.append(run_pair(name, args, have_torchdistill))
    text = report(pairs, args)
    print()
    print(text)
    print(f"(whole run: {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "pairs": pairs}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
