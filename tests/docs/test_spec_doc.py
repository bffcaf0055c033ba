"""docs/job-spec.md is generated from the spec's models; it must match what the script writes now."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_spec_doc", ROOT / "scripts" / "gen_spec_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_spec_doc_matches_the_models() -> None:
    generated = _generator().render()
    committed = (DOCS / "job-spec.md").read_text(encoding="utf-8")
    assert committed == generated, "docs/job-spec.md is stale: run .venv/bin/python scripts/gen_spec_doc.py"


def test_job_spec_doc_names_every_field() -> None:
    from pydantic import BaseModel

    from kdcore.spec import JobSpec

    text = (DOCS / "job-spec.md").read_text(encoding="utf-8")

    def paths(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            found.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found += paths(field.annotation, f"{prefix}{name}.")
        return found

    missing = [path for path in paths(JobSpec) if f"`{path}`" not in text]
    assert not missing, missing


def test_check_mode_exits_0_when_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_spec_doc.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_relative_links_in_the_docs_lead_somewhere() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
