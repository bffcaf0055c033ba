"""Resource ids: a type prefix and a ULID-style body, URL-safe and sortable by creation time.

Sortable ids let lists page newest-first on the primary key alone (`WHERE id < :cursor`), and
the prefix makes a job id passed where a file id belongs an obvious mistake in an error message.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_RANDOM_BITS = 80
_lock = threading.Lock()
_last = (0, 0)

ID_BODY = r"[0-9a-hjkmnp-tv-z]{26}"
ID_PATTERN = {prefix: re.compile(rf"^{prefix}_{ID_BODY}$") for prefix in ("user", "file", "job")}


def new_id(prefix: str) -> str:
    """`prefix_` + 48-bit milliseconds + 80 random bits, monotonic within this process."""
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_random = _last
        if millis <= last_millis:
            # Same millisecond (or the clock stepped back): count up so ids stay ordered.
            millis, random_part = last_millis, (last_random + 1) % (1 << _RANDOM_BITS)
        else:
            random_part = secrets.randbits(_RANDOM_BITS)
        _last = (millis, random_part)
    value = (millis << _RANDOM_BITS) | random_part
    body = "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
    return f"{prefix}_{body}"


def is_id(prefix: str, value: str) -> bool:
    return bool(ID_PATTERN[prefix].match(value))
