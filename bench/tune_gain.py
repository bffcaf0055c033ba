"""What `tune` buys (issue 17): a tuned job against the same job on the defaults, through the service.

    .venv/bin/python bench/tune_gain.py                       # both cases (about 30-60 minutes on 2 cores)
    .venv/bin/python bench/tune_gain.py --cases digits_rgb    # the newcomer's case alone
    .venv/bin/python bench/tune_gain.py --quick               # a smoke run of every step (a few minutes)

Two cases, each run through the cluster setup (PostgreSQL, Redis, `distillery api` and two
`distillery worker` processes, so trials run two at a time):

* `digits_rgb`, the newcomer's case of issue 14: a torchvision ResNet-18 teacher (trained here, in
  plain PyTorch, on the pixels in [0, 1]) distilled into `resnet_small` on an ImageFolder zip of
  RGB digits that this script builds from ../shared/data/mnist_small.npz (6,000 train / 1,000
  test images, each digit in a random ink colour on a random dark background).
* `mnist_800`: Hinton et al.'s 800-800 MLP student under a 1200-1200 MLP teacher (trained here) on
  the full MNIST (60,000 / 10,000).

For each case two jobs are submitted with the same spec: the defaults (T = 4, alpha = 0.9, plus
the baseline, `stages.baseline`, which is on by default), and a tuned job (`tune`: TPE over
T in [1, 20] on a log scale and alpha in [0.1, 1], each trial a quarter of the full run's epochs,
median pruning; chosen on the validation split). The table gives each job's test accuracy (the
test split is never used to choose), the baseline's, and the search's cost: the epochs its trials
ran against the full run's epochs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from tests.e2e.stack import Stack  # noqa: E402
from tests.support import postgres_database  # noqa: E402
from tests.worker.support import redis_database  # noqa: E402

SPACE = {"method.temperature": {"low": 1.0, "high": 20.0, "log": True}, "method.alpha": {"low": 0.1, "high": 1.0}}
BENCH_ENV = {"DISTILLERY_MAX_CONCURRENT_JOBS": "1000", "DISTILLERY_LOG_JSON": "false"}


@dataclass
class Case:
    name: str
    description: str
    teacher: Path
    data: Path
    spec: dict[str, Any]
    teacher_seconds: float


@dataclass
class Row:
    case: str
    teacher: float
    baseline: float
    default: float
    tuned: float
    best: dict[str, float]
    trials: int
    pruned: int
    trial_epochs: int
    full_epochs: int
    default_s: float
    tuned_s: float


# ------------------------------------------------------------------------------------------- cases


def _train(model: Any, x: Any, y: Any, *, epochs: int, lr: float, batch: int = 64, seed: int = 0) -> Any:
    """A plain supervised loop: the user's own teacher, made before Distillery sees it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # A teacher worth distilling: trained to convergence (cosine decay), not a few rough epochs, or the
    # student trained alone beats it and no T or alpha can help.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-len(x) // batch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        predictions = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((predictions == y).float().mean())


def _save_teacher(model: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _colour_digits(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x H x W grey digits -> N x H x W x 3: a random ink colour on a random dark background."""
    ink = rng.uniform(0.55, 1.0, size=(len(images), 1, 1, 3))
    ground = rng.uniform(0.0, 0.35, size=(len(images), 1, 1, 3))
    alpha = images[..., None].astype(np.float64) / 255.0
    return np.clip(255.0 * (alpha * ink + (1 - alpha) * ground), 0, 255).astype(np.uint8)


def _imagefolder_zip(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    from PIL import Image

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for split, (images, labels) in splits.items():
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                buffer = io.BytesIO()
                Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
                archive.writestr(f"{split}/{int(label)}/{index:05d}.png", buffer.getvalue())
    return path


def digits_rgb(folder: Path, *, quick: bool) -> Case:
    import torch

    from kdcore.models import build_model

    rng = np.random.default_rng(0)
    with np.load(DATA / "mnist_small.npz") as arrays:
        x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    if quick:
        x_train, y_train, x_test, y_test = x_train[:1200], y_train[:1200], x_test[:300], y_test[:300]
    rgb_train, rgb_test = _colour_digits(x_train, rng), _colour_digits(x_test, rng)
    data = _imagefolder_zip(folder / "digits_rgb.zip", {"train": (rgb_train, y_train), "test": (rgb_test, y_test)})

    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = build_model("resnet18", {}, (3, 28, 28), 10)

    def tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)

    teacher = _train(teacher, tensor(rgb_train), torch.from_numpy(y_train), epochs=3 if quick else 12, lr=1e-3)
    seconds = time.perf_counter() - started
    print(f"digits_rgb: resnet18 teacher {_accuracy(teacher, tensor(rgb_test), torch.from_numpy(y_test)):.4f} "
          f"on test ({seconds:.0f} s)", flush=True)
    spec = {
        "teacher": {"file": "", "arch": "resnet18"},
        "student": {"arch": "resnet_small"},
        "data": {"train": "", "val_fraction": 0.1},
        "stages": {"distill_epochs": 2 if quick else 8},
        "export": [],
    }
    return Case("digits_rgb", "resnet18 → resnet_small, RGB digits ImageFolder (6,000 / 1,000)",
                _save_teacher(teacher, folder / "resnet18.safetensors"), data, spec, seconds)


def mnist_800(folder: Path, *, quick: bool) -> Case:
    import torch

    from kdcore.models import build_model

    source = DATA / ("mnist_small.npz" if quick else "mnist.npz")
    with np.load(source) as arrays:
        x = torch.from_numpy(arrays["x_train"]).float().div(255).unsqueeze(1)
        y = torch.from_numpy(arrays["y_train"])
        x_test = torch.from_numpy(arrays["x_test"]).float().div(255).unsqueeze(1)
        y_test = torch.from_numpy(arrays["y_test"])
    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [1200, 1200], "dropout": 0.2}, (1, 28, 28), 10)
    teacher = _train(teacher, x, y, epochs=2 if quick else 20, lr=1e-3, batch=128)
    seconds = time.perf_counter() - started
    print(f"mnist_800: 1200-1200 teacher {_accuracy(teacher, x_test, y_test):.4f} on test ({seconds:.0f} s)",
          flush=True)
    spec = {
        "teacher": {"file": "", "arch": "mlp", "arch_args": {"hidden": [1200, 1200], "dropout": 0.2}},
        "student": {"arch": "mlp", "arch_args": {"hidden": [800, 800]}},
        "data": {"train": "", "val_fraction": 0.1},
        "stages": {"distill_epochs": 2 if quick else 8},
        "batch_size": 128,
        "export": [],
    }
    return Case("mnist_800", "1200-1200 → 800-800 MLP, MNIST (60,000 / 10,000)",
                _save_teacher(teacher, folder / "mlp1200.safetensors"), source, spec, seconds)


CASES = {"digits_rgb": digits_rgb, "mnist_800": mnist_800}


# ------------------------------------------------------------------------------------------- running


def start_cluster(root: Path, exit_stack: ExitStack) -> Stack:
    database_url = exit_stack.enter_context(postgres_database("bench_tune"))
    broker_url = exit_stack.enter_context(redis_database())
    stack = Stack(root, database_url=database_url, broker_url=broker_url, fast=False, **BENCH_ENV)
    exit_stack.callback(stack.stop)
    stack.create_user()
    stack.start_api()
    for name in ("worker-1", "worker-2"):
        stack.start_worker(name, "default", "cpu")
    return stack


def wait(stack: Stack, job_id: str, *, timeout: float) -> dict[str, Any]:
    job = stack.wait_for_state(job_id, "succeeded", "failed", "cancelled", timeout=timeout)
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['state']}: {job.get('error')}\n{stack.log_tails()}")
    return job


def run_case(stack: Stack, case: Case, *, trials: int, timeout: float) -> Row:
    teacher_id = stack.upload(case.teacher, "teacher")
    data_id = stack.upload(case.data, "dataset")
    spec = json.loads(json.dumps(case.spec))
    spec["teacher"]["file"], spec["data"]["train"] = teacher_id, data_id
    tuned_spec = {**spec, "tune": {"trials": trials, "space": SPACE, "budget": 0.25, "sampler": "tpe",
                                   "parallel": 2}}

    started = time.perf_counter()
    default_id, tuned_id = stack.submit(spec), stack.submit(tuned_spec)
    default = wait(stack, default_id, timeout=timeout)
    default_s = time.perf_counter() - started
    tuned = wait(stack, tuned_id, timeout=timeout)
    tuned_s = time.perf_counter() - started

    search = tuned["search"]
    trial_rows = search["trials"]
    full_epochs = int(spec["stages"]["distill_epochs"])
    return Row(
        case=case.name,
        teacher=default["metrics"]["teacher"]["accuracy"],
        baseline=default["metrics"]["baseline"]["accuracy"],
        default=default["metrics"]["student"]["accuracy"],
        tuned=tuned["metrics"]["student"]["accuracy"],
        best={k: float(v) for k, v in search["best"].items()},
        trials=len(trial_rows),
        pruned=sum(bool(t["pruned"]) for t in trial_rows),
        trial_epochs=sum(int(t["epochs_run"]) for t in trial_rows),
        full_epochs=full_epochs,
        default_s=default_s,
        tuned_s=tuned_s,
    )


def print_table(rows: list[Row], cases: dict[str, Case]) -> None:
    print()
    print("| case | teacher | baseline | defaults (T 4, α 0.9) | tuned | chosen T, α | tuned − defaults "
          "| tuned − baseline | trials (pruned) | trial-epochs / full run's | wall s: defaults, tuned |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        chosen = f"{r.best.get('method.temperature', 4.0):.2f}, {r.best.get('method.alpha', 0.9):.2f}"
        print(f"| {cases[r.case].description} | {100 * r.teacher:.2f} | {100 * r.baseline:.2f} "
              f"| {100 * r.default:.2f} | {100 * r.tuned:.2f} | {chosen} | {100 * (r.tuned - r.default):+.2f} "
              f"| {100 * (r.tuned - r.baseline):+.2f} | {r.trials} ({r.pruned}) "
              f"| {r.trial_epochs} / {r.full_epochs} = {r.trial_epochs / r.full_epochs:.2f}x "
              f"| {r.default_s:.0f}, {r.tuned_s:.0f} |")
    print()
    for r in rows:
        met = r.tuned >= r.default and r.tuned >= r.baseline
        print(f"{r.case}: tuned >= defaults and >= baseline: {'met' if met else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="Small data, few epochs and trials: a smoke run.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    trials = 3 if args.quick else args.trials

    rows: list[Row] = []
    cases: dict[str, Case] = {}
    with tempfile.TemporaryDirectory(prefix="distillery-tune-bench-") as scratch, ExitStack() as exit_stack:
        root = Path(scratch)
        stack = start_cluster(root / "service", exit_stack)
        for name in args.cases:
            folder = root / name
            folder.mkdir()
            cases[name] = CASES[name](folder, quick=args.quick)
            rows.append(run_case(stack, cases[name], trials=trials, timeout=4 * 3600))
            print(f"{name}: {rows[-1]}", flush=True)
    print_table(rows, cases)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0 if all(r.tuned >= r.default and r.tuned >= r.baseline for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
