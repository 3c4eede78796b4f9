"""``REGION`` or ``REGION@VERSION``: how a request, the OpenAI ``model`` field and the CLI name an adapter.

One parser for all three, so that they accept and refuse the same strings. The name is never used as a path: it
is only compared with names the registry listed itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SPEC_RE = re.compile(r"([A-Za-z0-9_-]{1,64})(?:@([1-9][0-9]{0,8}))?")  # fullmatch: no trailing-newline slip
VERSION_MAX = 999_999_999


class BadRegionSpec(ValueError):
    """A string that is not NAME or NAME@VERSION; ``source`` says where it came from (header, field, argument)."""

    def __init__(self, value: str, source: str):
        super().__init__(f"bad region {show(value)} in {source}: expected NAME or NAME@VERSION, NAME being 1-64 "
                         "letters, digits, '_' or '-' and VERSION a whole number from 1")
        self.value, self.source = value, source


@dataclass(frozen=True)
class RegionSpec:
    name: str
    version: int | None = None  # None = the latest servable version

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_region(value: str, source: str = "region") -> RegionSpec:
    """``"US"``, ``"china@2"`` -> RegionSpec; anything else (paths, ``..``, ``@-1``, ``@1.0``, ``@0``, control
    characters, lookalike letters, long values) -> BadRegionSpec."""
    m = SPEC_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise BadRegionSpec(value if isinstance(value, str) else repr(value), source)
    return RegionSpec(m.group(1), int(m.group(2)) if m.group(2) else None)


def show(value: str, limit: int = 40) -> str:
    """A client-given value safe to echo in an error or a log line: repr (control characters escaped), cut short."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))
