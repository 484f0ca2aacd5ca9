"""Digest value type (parsed once at the edge) and the streaming hashers."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

import xxhash


class Algo(StrEnum):
    MD5 = "md5"
    SHA256 = "sha256"

    @property
    def hex_len(self) -> int:
        return _HEX_LEN[self._value_]

    def new(self):
        return hashlib.new(self._value_)

    def parse_hex(self, text: object) -> str:
        """Validate a hex digest of this algorithm; lowercase. ValueError otherwise."""
        if isinstance(text, str) and _HEX_RE[self._value_].match(text):
            return text.lower()
        raise ValueError(
            f"{text!r} is not a {self._value_} digest ({self.hex_len} hexadecimal characters)"
        )

    @classmethod
    def parse(cls, value: object) -> Algo:
        if value is None:
            return cls.MD5
        if isinstance(value, str):
            for algo in cls:
                if algo.value == value.lower():
                    return algo
        raise ValueError(f'unknown algo {value!r}: use "md5" or "sha256"')

    @classmethod
    def for_hex_len(cls, n: int) -> Algo | None:
        return {32: cls.MD5, 64: cls.SHA256}.get(n)


_HEX_LEN = {"md5": 32, "sha256": 64}
_HEX_RE = {name: re.compile(rf"[0-9a-fA-F]{{{n}}}\Z") for name, n in _HEX_LEN.items()}


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated, lowercase hex digest of a known algorithm."""

    algo: Algo
    hex: str

    @classmethod
    def parse(cls, algo: Algo, text: object) -> Digest:
        return cls(algo, algo.parse_hex(text))

    @classmethod
    def parse_any(cls, text: str) -> Digest:
        """Parse a digest whose algorithm is told by its length (32: md5, 64: sha256)."""
        algo = Algo.for_hex_len(len(text))
        if algo is None:
            raise ValueError(f"{text!r} is not an md5 or sha256 digest")
        return cls.parse(algo, text)

    def __str__(self) -> str:
        return self.hex


class ChunkHasher:
    """The declared digest's hasher plus xxh3-128, fed in order, counting bytes."""

    __slots__ = ("_h", "_x", "algo", "size")

    def __init__(self, algo: Algo):
        self.algo = algo
        self._h = algo.new()
        self._x = xxhash.xxh3_128()
        self.size = 0

    def update(self, data) -> None:
        self._h.update(data)
        self._x.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(self.algo, self._h.hexdigest())

    def xxh3(self) -> str:
        return self._x.hexdigest()
