"""The import rules between the packages, checked two ways.

Statically, by import-linter's contracts in pyproject.toml (every import, lazy ones inside
functions included, followed through other modules: `api` reaching torch through a kdcore module
breaks the rule as surely as `import torch` in `api`). And at run time: what a process has loaded
after building the API, or after loading the client's commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_import_contracts_are_kept() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 6
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout


def test_the_api_loads_neither_torch_nor_the_worker(tmp_path: Path) -> None:
    loaded = _loaded_after(
        "from service.settings import Settings\n"
        "from api.main import create_app\n"
        f"create_app(Settings(data_dir={str(tmp_path)!r}))\n"
    )
    assert {"api", "service", "fastapi"} <= loaded
    assert loaded & {"torch", "torchvision", "worker", "client", "onnxruntime"} == set()


def test_the_client_loads_no_server_code() -> None:
    loaded = _loaded_after("import client, client.cli, distillery.cli")
    assert {"client", "httpx"} <= loaded
    assert loaded & {"service", "api", "worker", "torch", "fastapi", "sqlalchemy", "celery", "kombu"} == set()


def test_a_worker_run_loads_no_api(tmp_path: Path) -> None:
    loaded = _loaded_after("import worker.runner, worker.tasks, worker.reaper, worker.cli, worker.celery_app")
    assert {"worker", "service", "celery"} <= loaded
    assert loaded & {"api", "client", "fastapi", "starlette"} == set()
