"""The student architectures a job can name."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter

from kdcore.architectures import ArchInfo
from kdcore.architectures import list_architectures as registry_entries

router = APIRouter(prefix="/architectures", tags=["architectures"])


@lru_cache(maxsize=1)
def _architectures() -> list[ArchInfo]:
    # The registry is fixed at import time; building every JSON schema once is enough.
    return registry_entries()


@router.get("", response_model=list[ArchInfo], summary="Student architectures the registry offers")
async def list_architectures() -> list[ArchInfo]:
    """Every registry architecture with its argument schema and defaults (`student.arch`, `student.arch_args`)."""
    return _architectures()
