"""Signed envelopes: with signing keys set, producers sign every stream entry and workers
dead-letter an entry whose signature is missing, made with an unknown key, or wrong.

``signing_keys`` (setting, ``TOKIWA_SIGNING_KEYS``) is ``"kid=secret,kid2=secret2"``: every
key a worker accepts; producers sign with ``signing_key_id`` (default: the first key). To
rotate: add the new key to every process's list, switch ``signing_key_id`` on the producers,
then drop the old key once no entry signed with it is left in the stream.

The signature is HMAC-SHA256 over ``tokiwa-v1``, the entry's ``id``, ``type`` and ``body``
(the wire form of the whole envelope), newline-separated; the entry carries ``kid`` and
``sig`` (hex) next to ``id``, ``type`` and ``body``. Dead-letter reasons: ``unsigned``,
``unknown_key``, ``bad_signature``. It proves who wrote an entry (a holder of a key), not
when: an entry copied within the stream (a requeued dead letter) stays valid.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from orchestrator.config import Settings, parse_signing_keys

_PREFIX = b"tokiwa-v1\n"


@dataclass(frozen=True, slots=True)
class Keyring:
    """The keys a process accepts, and the one it signs with (None: it does not sign)."""

    keys: Mapping[str, bytes]
    signing: str | None

    @property
    def active(self) -> bool:
        return bool(self.keys)


@lru_cache(maxsize=32)
def _keyring(spec: str | None, signing: str | None) -> Keyring:
    keys = parse_signing_keys(spec)  # checked when the settings were built
    return Keyring(keys, signing or next(iter(keys), None))


def keyring(settings: Settings) -> Keyring:
    return _keyring(settings.signing_keys, settings.signing_key_id)


def _mac(secret: bytes, entry_id: bytes, etype: bytes, body: bytes) -> str:
    return hmac.new(secret, _PREFIX + entry_id + b"\n" + etype + b"\n" + body, hashlib.sha256).hexdigest()


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def sign(fields: dict[str, bytes | str], settings: Settings) -> dict[str, bytes | str]:
    """``fields`` with ``kid`` and ``sig`` added when this process signs (unchanged otherwise)."""
    ring = keyring(settings)
    if ring.signing is None:
        return fields
    fields["kid"] = ring.signing
    fields["sig"] = _mac(ring.keys[ring.signing], _b(fields["id"]), _b(fields["type"]), _b(fields["body"]))
    return fields


def check(fields: Mapping[bytes, bytes], settings: Settings) -> tuple[str, str] | None:
    """None when the entry may be processed; else ``(reason, error)`` to dead-letter it with.
    Without signing keys every entry passes."""
    ring = keyring(settings)
    if not ring.active:
        return None
    kid, sig = fields.get(b"kid"), fields.get(b"sig")
    if not kid or not sig:
        return "unsigned", "entry has no signature (kid, sig) and this worker requires signed entries"
    secret = ring.keys.get(kid.decode("utf-8", "replace"))
    if secret is None:
        return "unknown_key", f"entry is signed with key {kid.decode('utf-8', 'replace')!r}, not one of {sorted(ring.keys)}"
    expected = _mac(secret, fields.get(b"id", b""), fields.get(b"type", b""), fields.get(b"body", b""))
    if not hmac.compare_digest(expected.encode(), sig):
        return "bad_signature", f"signature does not match the entry (key {kid.decode('utf-8', 'replace')!r})"
    return None
