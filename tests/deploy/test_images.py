"""The API image installs without torch: its requirement list matches pyproject.toml minus the
training stack, and the API starts and checks uploads with that stack blocked from import."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
API_REQUIREMENTS = ROOT / "docker" / "requirements-api.txt"
# Only workers (and `distillery distill`) need these.
TRAINING_STACK = {"torch", "torchvision", "onnxruntime", "onnxscript", "matplotlib", "tensorboard", "safetensors",
                  "tqdm"}
# In the image but not (yet) in pyproject.toml: S3 storage through fsspec.
IMAGE_EXTRAS = {"s3fs"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_api_requirements_are_pyprojects_minus_the_training_stack() -> None:
    declared = {_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    lines = API_REQUIREMENTS.read_text().splitlines()
    listed = {_name(line) for line in lines if line.strip() and not line.startswith("#")}
    assert listed - IMAGE_EXTRAS == declared - TRAINING_STACK, (
        "docker/requirements-api.txt and pyproject.toml disagree: add a new dependency to both "
        "(or to TRAINING_STACK here if only workers need it)"
    )


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
        from api.migrate import upgrade_to_head
        from api.settings import get_settings
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
