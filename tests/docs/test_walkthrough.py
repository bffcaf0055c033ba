"""The docs' commands, run as a newcomer runs them, so the README and docs/ cannot rot.

A fresh virtual environment gets the checkout installed the way `make install` does it (editable,
with its console script); it reuses this environment's packages through a .pth file, because
installing torch again is not possible here. Then: the quickstart's make targets, the MNIST
example (train_teacher.py, `distillery distill` on a copy of job.yaml with fewer epochs), and the
service walkthrough of docs/first-distillation.md (`distillery serve`, create-user, login,
submit --wait, download, and the curl block exactly as written in the page).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.client.conftest import Server, base_env, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLE = ROOT / "examples" / "mnist"
pytestmark = pytest.mark.slow


def _distillery(venv: Path) -> list[str]:
    """The fresh environment's entry point (DISTILLERY_CLI, as in tests/client, replaces it)."""
    return shlex.split(os.environ.get("DISTILLERY_CLI", "")) or [str(venv / "bin" / "distillery")]


def _doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the checkout installed in it (editable, as `make install` does)."""
    folder = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(folder), "platbase": str(folder)}))
    purelib.mkdir(parents=True, exist_ok=True)
    reused = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (purelib / "_reuse_dev_env.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in reused)
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(folder / "bin" / "python"), "install", "--quiet",
         "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    assert (folder / "bin" / "distillery").exists()
    return folder


@pytest.fixture(scope="module")
def env(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data_dir = tmp_path_factory.mktemp("fresh-data")
    environment = base_env(data_dir, tmp_path_factory.mktemp("fresh-config"))
    environment.pop("VIRTUAL_ENV", None)
    environment["PATH"] = f"{venv / 'bin'}{os.pathsep}{environment['PATH']}"
    return environment


@pytest.fixture(scope="module")
def quick_job(venv: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's teacher (one epoch) and a copy of job.yaml with fewer epochs, side by side."""
    folder = tmp_path_factory.mktemp("mnist")
    trained = subprocess.run(
        [str(venv / "bin" / "python"), str(EXAMPLE / "train_teacher.py"), "--epochs", "1",
         "--out", str(folder / "teacher.safetensors")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert trained.returncode == 0, trained.stderr
    assert '"arch": "cnn"' in trained.stdout  # it prints the arch the spec must name
    spec = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    assert spec["teacher"]["file"] == "teacher.safetensors"  # relative to the spec's folder
    assert (EXAMPLE / spec["data"]["train"]).exists()
    shutil.copy(EXAMPLE / spec["data"]["train"], folder / spec["data"]["train"])
    spec["stages"] = {**spec["stages"], "distill_epochs": 1}
    spec["threads"] = 1
    (folder / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def test_quickstart_is_the_two_make_targets() -> None:
    for page in (_doc("quickstart.md"), (ROOT / "README.md").read_text()):
        assert "make serve" in page and "make test" in page
    serve = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "distillery serve" in serve.stdout
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "scripts/test.sh" in test.stdout
    assert "ensure_tools.sh" in (ROOT / "scripts" / "test.sh").read_text()


def test_the_example_runs_locally(venv: Path, env: dict[str, str], quick_job: Path) -> None:
    page = _doc("first-distillation.md")
    assert ".venv/bin/python examples/mnist/train_teacher.py" in page
    assert ".venv/bin/distillery distill examples/mnist/job.yaml --out out/mnist" in page

    result = subprocess.run(
        [*_distillery(venv), "distill", str(quick_job / "job.yaml"), "--out", str(quick_job / "out")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["accuracy"]) == {"teacher", "student", "baseline"}
    for name in ("student.safetensors", "student.onnx", "metrics.json", "report.md", "history.csv"):
        assert (quick_job / "out" / name).exists(), name


@pytest.fixture(scope="module")
def served(venv: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """`distillery serve` from the fresh environment, and the key of a user made as the page says."""
    created = subprocess.run([*_distillery(venv), "admin", "create-user", "alice"], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert created.returncode == 0, created.stderr
    server = Server([*_distillery(venv), "serve"], env, free_port(),
                    Path(env["DISTILLERY_DATA_DIR"]) / "serve.log")
    server.start()
    try:
        yield server.url, created.stdout.split()[-1]
    finally:
        server.stop()


def test_the_cli_walkthrough(
    venv: Path, served: tuple[str, str], env: dict[str, str], quick_job: Path, tmp_path: Path
) -> None:
    url, key = served
    page = _doc("first-distillation.md")
    for command in (
        ".venv/bin/distillery admin create-user alice",
        ".venv/bin/distillery login http://127.0.0.1:8000",
        ".venv/bin/distillery submit examples/mnist/job.yaml --wait",
        ".venv/bin/distillery download JOB --out out/mnist-job",
    ):
        assert command in page, command

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_distillery(venv), *args], env=env, capture_output=True, text=True, timeout=600,
                              check=False)

    assert cli("login", url, "--api-key", key).returncode == 0
    submitted = cli("submit", str(quick_job / "job.yaml"), "--wait", "--json")
    assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-3000:])
    job = json.loads(submitted.stdout)
    assert job["state"] == "succeeded"
    assert job["id"] in cli("list").stdout
    downloaded = cli("download", job["id"], "--out", str(tmp_path / "mnist-job"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "mnist-job" / "report.md").exists()


def test_the_curl_walkthrough(
    served: tuple[str, str], env: dict[str, str], quick_job: Path, tmp_path: Path
) -> None:
    if not (shutil.which("curl") and shutil.which("jq") and shutil.which("sha256sum")):
        pytest.skip("the curl walkthrough needs curl, jq and sha256sum")
    url, key = served
    blocks = [block for block in _bash_blocks(_doc("first-distillation.md")) if "curl" in block]
    walkthrough, refused = blocks[0], blocks[1]
    # The page's placeholders for the server and the key; everything else runs as written.
    script = "\n".join(line for line in walkthrough.splitlines() if not line.startswith(("URL=", "KEY=")))
    (tmp_path / "examples" / "mnist").mkdir(parents=True)
    shutil.copy(quick_job / "teacher.safetensors", tmp_path / "examples" / "mnist" / "teacher.safetensors")
    shutil.copy(EXAMPLE / "mnist_small.npz", tmp_path / "examples" / "mnist" / "mnist_small.npz")
    shell_env = {**env, "URL": url, "KEY": key}

    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=shell_env,
                            capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "event: state" in result.stdout and '"state": "succeeded"' in result.stdout
    assert "student.onnx: OK" in result.stdout
    assert (tmp_path / "student.onnx").stat().st_size > 0

    refusal = "\n".join(line for line in refused.splitlines() if not line.startswith("#"))
    answer = subprocess.run(["bash", "-c", refusal], cwd=tmp_path,
                            env={**shell_env, "AUTH": f"Authorization: Bearer {key}"},
                            capture_output=True, text=True, timeout=60, check=False)
    error = json.loads(answer.stdout)["error"]
    assert error["field"] == "method.temperature" and error["code"] == "invalid_request"
