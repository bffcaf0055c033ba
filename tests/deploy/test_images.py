"""The images install the wheel with their extras, and the API's extra leaves the training stack out.

The API image is `distillery[server]`, the worker image `distillery[worker]`, both as regular
(non-editable) wheels; tests/deploy/test_packaging.py installs the same wheel into fresh virtual
environments. Here: the Dockerfile says so, pyproject's extras keep the training stack out of the
server's, and the API starts and checks uploads with that stack blocked from import.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# Only workers (and `distillery distill`) need these.
TRAINING_STACK = {"torch", "torchvision", "onnxruntime", "onnxscript", "matplotlib", "tensorboard", "safetensors",
                  "tqdm"}
SERVER_ONLY = {"fastapi", "uvicorn", "sqlalchemy", "celery", "alembic"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements(extra: str | None) -> set[str]:
    """The names an install of `distillery[extra]` asks for, with the extras it names expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    pending, seen = [extra] if extra else [], set()
    while pending:
        current = pending.pop()
        seen.add(current)
        for requirement in project["optional-dependencies"][current]:
            if (own := re.fullmatch(r"distillery\[([a-z,]+)\]", requirement)) is not None:
                pending += [e for e in own[1].split(",") if e not in seen]
            else:
                names.add(_name(requirement))
    return names


def _stage(name: str) -> str:
    text = DOCKERFILE.read_text()
    start = re.search(rf"^FROM \S+ AS {name}$", text, re.MULTILINE)
    assert start is not None, f"the Dockerfile has no {name} stage"
    end = re.search(r"^FROM ", text[start.end():], re.MULTILINE)
    return text[start.end(): start.end() + end.start()] if end else text[start.end():]


def test_the_images_install_the_wheel_with_their_extra() -> None:
    assert "pip wheel --no-deps" in _stage("wheel")
    for stage, extra in (("api", "server"), ("worker", "worker")):
        text = _stage(stage)
        assert f".whl)[{extra}]" in text, f"the {stage} image should install distillery[{extra}] from the wheel"
        assert not re.search(r"pip install[^\n]*\s-e\s", text), f"the {stage} image installs an editable checkout"
        assert "requirements" not in text
        assert "s3fs" in text, f"the {stage} image cannot reach S3 storage"  # docs/cluster.md says both have it
    assert not (ROOT / "docker" / "requirements-api.txt").exists()


def test_the_extras_keep_each_install_to_what_it_runs() -> None:
    client = _requirements(None)
    assert client & (TRAINING_STACK | SERVER_ONLY) == set(), "the plain install must be the client alone"
    assert len(client) <= 8
    server = _requirements("server")
    assert server & TRAINING_STACK == set(), "the API's extra pulls in the training stack"
    assert {"fastapi", "sqlalchemy", "alembic", "celery"} <= server
    assert {"torch", "celery", "sqlalchemy"} <= _requirements("worker")
    assert _requirements("all") >= server | _requirements("worker")


def test_api_starts_and_sniffs_uploads_without_the_training_stack(tmp_path: Path) -> None:
    blocked = sorted(TRAINING_STACK)
    script = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # any import of them now fails
        import os
        os.environ["DISTILLERY_DATA_DIR"] = {str(tmp_path)!r}
        import numpy as np
        from fastapi.testclient import TestClient
        from api.main import create_app
        from service.migrate import upgrade_to_head
        from service.settings import get_settings
        from kdcore.data_sniff import sniff_dataset
        upgrade_to_head(get_settings())
        client = TestClient(create_app())
        assert client.get("/livez").status_code == 200
        assert client.get("/v1/architectures").status_code == 401
        np.savez({str(tmp_path / "d.npz")!r}, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.arange(4))
        print(sniff_dataset({str(tmp_path / "d.npz")!r}))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
