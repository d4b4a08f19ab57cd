"""Preference ids: the canonical (r, c) of a preference, the model version and a checksum.

An id is *derived*, never allocated, so it stays valid after eviction, across restarts and on
any replica serving the same model version, which rebuilds the preference from the id alone::

    v1_333333-333333-333333_0_1a2b3c4d
    │  │                    │ └ checksum: sha256("<name>/<version>:<r>:<c>")[:8]
    │  │                    └ c in millionths
    │  └ r in millionths (dymu.preference.KEY_DECIMALS = 6 places), one per task
    └ model version

What the canonical preference is, is decided by :func:`dymu.preference.canonicalize` alone
(6 decimals, a fixed point): a POSTed preference and the preference decoded from its id are the
same object, hence the same tree, BN deltas and outputs. This module only spells keys as ids.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from dymu.preference import KEY_SCALE as SCALE
from dymu.preference import CanonicalKey, Preference, canonicalize, preference_of_key

from .errors import BadRequestError, MalformedPreferenceIdError, UnknownPreferenceIdError

_ID = re.compile(
    r"^(?P<version>[A-Za-z0-9.]{1,32})_(?P<r>[0-9]{1,7}(?:-[0-9]{1,7}){0,63})"
    r"_(?P<c>[0-9]{1,7})_(?P<check>[0-9a-f]{8})$"
)
EXAMPLE = "v1_333333-333333-333333_0_1a2b3c4d"


def _version_token(version: str | None) -> str:
    token = re.sub(r"[^A-Za-z0-9.]", ".", str(version or "dev"))[:32]
    return token or "dev"


def _checksum(model_name: str | None, version: str, r: str, c: str) -> str:
    text = f"{model_name or ''}/{version}:{r}:{c}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def encode(key: CanonicalKey, model_name: str | None, model_version: str | None) -> str:
    version = _version_token(model_version)
    r = "-".join(str(v) for v in key[0])
    c = str(key[1])
    return f"{version}_{r}_{c}_{_checksum(model_name, version, r, c)}"


def decode(
    pref_id: str, tasks: Sequence[str], model_name: str | None, model_version: str | None
) -> tuple[Preference, CanonicalKey]:
    """The canonical preference of ``pref_id``; raises with the reason when it is not one of
    this model version's ids (404 for another version, 422 for anything malformed)."""
    m = _ID.match(pref_id)
    if m is None:
        raise MalformedPreferenceIdError(
            f"malformed preference id {pref_id[:80]!r}: expected "
            f"<version>_<r in millionths, '-'-separated>_<c in millionths>_<checksum>, "
            f"e.g. {EXAMPLE}"
        )
    version, r_text, c_text, check = m.group("version", "r", "c", "check")
    if check != _checksum(model_name, version, r_text, c_text):
        raise MalformedPreferenceIdError(
            f"preference id {pref_id!r} fails its checksum: it was altered or mistyped, "
            f"or made by a model other than {model_name!r}"
        )
    ours = _version_token(model_version)
    if version != ours:
        raise UnknownPreferenceIdError(
            f"preference id {pref_id!r} belongs to model version {version}; this server "
            f"serves {model_name} {ours}: POST /preference again to get this version's id"
        )
    r_units = tuple(int(v) for v in r_text.split("-"))
    c_units = int(c_text)
    # The core's validator decides what a valid preference is (length, sum, range of c).
    canonicalize([v / SCALE for v in r_units], c_units / SCALE, tasks)
    if abs(sum(r_units) - SCALE) > len(r_units):
        raise MalformedPreferenceIdError(
            f"preference id {pref_id!r} is not canonical: its r sums to "
            f"{sum(r_units) / SCALE}, not 1"
        )
    key = (r_units, c_units)
    return preference_of_key(key), key


#: Decoded ids (a client sends the same few ids again and again; the checksum is a SHA-256).
#: Ids that fail to decode raise, and are not cached.
_decode_cached = lru_cache(maxsize=4096)(decode)


@dataclass(frozen=True)
class PreferenceIds:
    """The id space of one model version: parse (r, c), decode and encode ids, and pick the
    preference of a request. Needs only the manifest, so a router that never loads the weights
    (service/ray_app.py) derives the same ids as the replicas that serve them."""

    tasks: tuple[str, ...]
    model_name: str | None
    model_version: str | None
    default_preference: Preference
    default_key: CanonicalKey

    @classmethod
    def create(
        cls,
        tasks: Sequence[str],
        model_name: str | None,
        model_version: str | None,
        default_r: Any = None,
        default_c: float = 0.0,
    ) -> PreferenceIds:
        """``default_r`` None = uniform over the tasks."""
        r = default_r if default_r is not None else [1.0] * len(tasks)
        pref, key = canonicalize(r, default_c, tasks)
        return cls(tuple(tasks), model_name, model_version, pref, key)

    @classmethod
    def from_manifest(
        cls, manifest: Mapping[str, Any], default_r: Any = None, default_c: float = 0.0
    ) -> PreferenceIds:
        tasks = [t["name"] for t in manifest["tasks"]]
        return cls.create(
            tasks, manifest.get("name"), manifest.get("version"), default_r, default_c
        )

    @property
    def default_id(self) -> str:
        return self.encode(self.default_key)

    def encode(self, key: CanonicalKey) -> str:
        return encode(key, self.model_name, self.model_version)

    def parse(self, r: Any, c: Any) -> tuple[Preference, CanonicalKey]:
        return canonicalize(r, 0.0 if c is None else c, self.tasks)

    def decode(self, pref_id: str) -> tuple[Preference, CanonicalKey]:
        return _decode_cached(pref_id, self.tasks, self.model_name, self.model_version)

    def select(self, preference_id: str | None, r: Any, c: Any) -> tuple[Preference, CanonicalKey]:
        """The preference a /predict request asks for: by id, inline (r, c), or the default."""
        if preference_id is not None and (r is not None or c is not None):
            raise BadRequestError("give either preference_id or an inline (r, c), not both")
        if preference_id is not None:
            return self.decode(preference_id)
        if r is not None:
            return self.parse(r, c)
        if c is not None:
            raise BadRequestError("c was given without r: give both (or a preference_id)")
        return self.default_preference, self.default_key
