"""Templates, their filters and the headers every page carries."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from api.web import compare, report
from api.web.session import CSRF_FIELD, CSRF_HEADER, current_session, write_session
from api.web.timeline import stage_label

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"

# Scripts and styles come only from this site (no inline code), so an injected tag cannot run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@lru_cache(maxsize=64)
def _static_version(name: str) -> str:
    path = STATIC_DIR / name
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "0"


def static_url(name: str) -> str:
    """`/static/app.js?v=<content hash>`: browsers may cache it for good, and a new release busts it."""
    return f"/static/{name}?v={_static_version(name)}"


def filesize(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "—"
    seconds = max(0.0, ((now or datetime.now(UTC)) - value).total_seconds())
    for limit, unit in ((60, "s"), (3600, "min"), (86400, "h")):
        if seconds < limit:
            divisor = {"s": 1, "min": 60, "h": 3600}[unit]
            return f"{int(seconds // divisor)} {unit} ago"
    return f"{int(seconds // 86400)} d ago"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "—"
    seconds = round(float(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def iso(value: datetime | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.isoformat()


def clock(value: datetime | str | None) -> str:
    if isinstance(value, datetime):
        return value.strftime("%H:%M:%S")
    return (value or "")[11:19]


def file_label(row: Any) -> str:
    """`blobs.npz · 41.2 kB · 600 train / 200 test, 8×8, 4 classes` for the upload pickers."""
    info = row.info or {}
    parts = [row.name, filesize(row.size)]
    if row.purpose == "dataset" and info.get("format") == "txt":
        parts.append(f"text, {info.get('num_rows')} lines")
    elif row.purpose == "dataset" and info.get("kind") == "text":
        parts.append(f"{info.get('num_rows')} rows, columns {', '.join(info.get('columns') or [])}")
    elif row.purpose == "dataset" and info.get("num_train") is not None:
        shape = "×".join(str(n) for n in info.get("sample_shape") or [])
        test = f" / {info['num_test']} test" if info.get("num_test") else ""
        classes = f", {info['num_classes']} classes" if info.get("num_classes") else ""
        parts.append(f"{info['num_train']} train{test}, {shape}{classes}")
    elif row.purpose == "teacher" and info.get("hf"):
        hf = info["hf"]
        head = f", labels {'/'.join(hf['labels'])}" if hf.get("labels") else ", no head"
        if hf.get("task") == "causal_lm":
            head = ", causal LM"
        parts.append(f"hf {hf.get('model_type')}, {hf.get('num_layers')} layers{head}")
    elif row.purpose == "teacher" and info.get("format"):
        outputs = f", {info['output_size']} outputs" if info.get("output_size") else ""
        parts.append(f"{info['format']}{outputs}")
    return " · ".join(parts)


def artifact_url(job_id: str, name: str) -> str:
    return f"/web/jobs/{job_id}/artifacts/{quote(name)}"


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
    env = templates.env
    env.globals.update(
        static=static_url, stage_label=stage_label, file_label=file_label, artifact_url=artifact_url,
        server_now=lambda: datetime.now(UTC), result_of=compare.result_of, job_warnings=compare.warnings_of,
        CSRF_FIELD=CSRF_FIELD, CSRF_HEADER=CSRF_HEADER,
    )
    env.filters.update(
        filesize=filesize, ago=ago, duration=duration, iso=iso, clock=clock,
        percent=report.percent, count=report.count,
    )
    env.trim_blocks = True
    env.lstrip_blocks = True
    return templates


templates = _templates()


ResponseT = TypeVar("ResponseT", bound=Response)


def secure(response: ResponseT) -> ResponseT:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def render(request: Request, name: str, context: dict[str, Any] | None = None, *, status_code: int = 200,
           headers: dict[str, str] | None = None) -> HTMLResponse:
    web_session = current_session(request)
    full = {"csrf_token": web_session.csrf, "user": None, **(context or {})}
    response = templates.TemplateResponse(request, name, full, status_code=status_code, headers=headers)
    if web_session.fresh:
        write_session(request, response, web_session)
        web_session.fresh = False
    return secure(response)
