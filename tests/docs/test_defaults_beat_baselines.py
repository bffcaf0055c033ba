"""With the default settings, the docs' first jobs beat their baselines (issue 14, "better defaults").

The jobs a newcomer runs first, with the baseline (`stages.baseline`, on by default) beside the student:

* the README's example: examples/mnist/job.yaml as written (tests/docs/test_first_distillation_doc.py
  runs it and checks that it beats its baseline beside the page's figures);
* the curl example of docs/first-distillation.md, which leaves T, alpha, the epochs and the optimiser
  to the defaults: the spec the page's `jq` builds, run here by the engine on the example's teacher
  (the page's curl block itself runs in test_walkthrough.py, on a one-epoch teacher).

The third case the issue names, a ResNet-18 teacher into `resnet_small` on RGB digits, is not here:
on the digits we can build, `resnet_small` alone matches or beats the ResNet-18 teacher, so no
setting lets distillation beat its baseline there (docs/choosing-t-and-alpha.md has the figures).

One CPU thread and the spec's seed: a run is the same on every run of one machine. The figure the
assertion names was measured on an Intel Xeon (2026-12-08); another processor rounds differently,
so the test asserts the inequality and a floor a little under the measured figure, not the digits.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(spec_fields: dict[str, Any], teacher: Path, train: Path, out: Path) -> dict[str, Any]:
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import parse_spec

    spec = parse_spec({**spec_fields, "threads": 1})
    result = run_job(spec, JobInputs(teacher=teacher, train=train), RunOptions(out_dir=out))
    return result.metrics


def _curl_spec(teacher: Path, data: Path) -> dict[str, Any]:
    """The JSON the page's `jq -n ... '{...}'` builds, built by jq from the page's own text."""
    page = (ROOT / "docs" / "first-distillation.md").read_text(encoding="utf-8")
    program = re.search(r"SPEC=\$\(jq -n --arg teacher \"\$TEACHER\" --arg data \"\$DATA\" '(\{.*?\})'\)", page,
                        flags=re.DOTALL)
    assert program is not None, "the curl example's spec is no longer built by jq as this test expects"
    built = subprocess.run(["jq", "-n", "--arg", "teacher", str(teacher), "--arg", "data", str(data),
                            program.group(1)], capture_output=True, text=True, check=True, timeout=30)
    spec: dict[str, Any] = json.loads(built.stdout)
    return spec


@pytest.mark.skipif(shutil.which("jq") is None, reason="the curl example's spec is built by jq")
def test_the_curl_example_beats_its_baseline_with_the_defaults(tmp_path: Path) -> None:
    import torch

    script = _load("first_distillation")
    sys.path.insert(0, str(script.EXAMPLE))
    import train_teacher  # examples/mnist/train_teacher.py with its defaults, as the page runs it

    torch.set_num_threads(1)
    model, _ = train_teacher.train(script.EXAMPLE / "mnist_small.npz", epochs=train_teacher.EPOCHS,
                                   seed=train_teacher.SEED)
    teacher = _load("tune_gain")._save_teacher(model, tmp_path / "teacher.safetensors")
    data = script.EXAMPLE / "mnist_small.npz"
    spec = _curl_spec(teacher, data)
    assert "method" not in spec and "distill_epochs" not in spec["stages"]  # the defaults decide

    metrics = _run(spec, teacher, data, tmp_path / "out")

    student, baseline = metrics["student"]["accuracy"], metrics["baseline"]["accuracy"]
    # Measured: student 0.929, baseline 0.917 (the README example's figures: the same job).
    assert student > baseline, (student, baseline)
    assert student >= 0.92, student
