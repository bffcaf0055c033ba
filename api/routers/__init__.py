"""One router per resource. The /v1 ones are mounted behind the auth dependency in api.main."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

from api.errors import ErrorBody


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can return (all share ErrorBody)."""
    descriptions = {
        400: "Malformed request.",
        401: "Missing or invalid API key.",
        403: "Account disabled.",
        404: "No such resource, or it is not yours.",
        409: "Conflicts with the resource's current state.",
        410: "Gone: the resumable upload lapsed.",
        413: "Upload too large or storage quota exceeded.",
        415: "Wrong Content-Type for the body.",
        422: "Invalid request; `error.field` names the field.",
        429: "Per-user limit reached.",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


def download_headers(name: str, size: int, sha256: str) -> dict[str, str]:
    """Length, a safe attachment name, and the checksum twice: plainly and as an RFC 3230 Digest."""
    digest = base64.b64encode(bytes.fromhex(sha256)).decode()
    return {
        "Content-Length": str(size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name.rsplit('/', 1)[-1])}",
        "X-Checksum-Sha256": sha256,
        "Digest": f"sha-256={digest}",
        "ETag": f'"{sha256}"',
    }
