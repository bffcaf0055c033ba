"""API keys: `dk_<lookup id>_<secret>`, 160 random bits of secret, stored as a sha256.

The lookup id finds the row without scanning; the secret is compared against the stored hash
in constant time. A plain sha256 is enough here (unlike for passwords): the secret is random
and long, so there is nothing for a dictionary or a GPU to guess.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "dk"
_LOOKUP_BYTES = 8  # 64 bits: ids never collide in practice, and a collision is a primary-key error
_SECRET_BYTES = 20  # 160 bits
_KEY_PATTERN = re.compile(r"^dk_([a-z2-7]{13})_([a-z2-7]{32})$")


@dataclass(frozen=True)
class NewKey:
    lookup_id: str
    plaintext: str
    secret_hash: str


def _token(nbytes: int) -> str:
    return base64.b32encode(secrets.token_bytes(nbytes)).decode().rstrip("=").lower()


def generate_key() -> NewKey:
    lookup_id, secret = _token(_LOOKUP_BYTES), _token(_SECRET_BYTES)
    plaintext = f"{KEY_PREFIX}_{lookup_id}_{secret}"
    return NewKey(lookup_id=lookup_id, plaintext=plaintext, secret_hash=hash_key(plaintext))


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def parse_key(plaintext: str) -> str | None:
    """The lookup id of a well-formed key, else None."""
    match = _KEY_PATTERN.match(plaintext)
    return match.group(1) if match else None


def key_matches(plaintext: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_key(plaintext), secret_hash)
