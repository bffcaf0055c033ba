"""The specs committed beside the benchmarks are the ones the docs quote: each must still be a valid job."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcore.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "bench" / "specs").rglob("*.yaml"))


def test_there_are_bench_specs() -> None:
    assert len(SPECS) >= 10


@pytest.mark.parametrize("path", SPECS, ids=lambda path: str(path.relative_to(ROOT / "bench" / "specs")))
def test_bench_spec_is_a_valid_job(path: Path) -> None:
    spec = load_spec(path)
    # paths stay relative to the spec's folder, as `distillery distill` resolves them, so they work in any clone
    assert not Path(spec.teacher.file).is_absolute() and not Path(spec.data.train).is_absolute()
    # ...and they point where a checkout's data and runs are, whatever the spec's folder depth
    shared = (ROOT.parent / "shared" / "data").resolve()
    for data in (spec.data.train, spec.data.test):
        if data is not None:
            assert (path.parent / data).resolve().is_relative_to(shared), data
    teacher = (path.parent / spec.teacher.file).resolve()
    assert teacher.is_relative_to(ROOT / "runs") or teacher.is_relative_to(path.parent), spec.teacher.file
