"""Parsing of WWW-Authenticate challenges (RFC 9110 section 11.6.1).

Kept apart from auth.py, with only the standard library, so the warm-pull path can read a
challenge without importing the HTTP client.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SPACE = " \t"


@dataclass
class Challenge:
    """One challenge of a WWW-Authenticate header: a lowercase scheme and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(headers: Iterable[str]) -> list[Challenge]:
    """Parse WWW-Authenticate header values (RFC 9110 section 11.6.1) into challenges.

    Scheme and parameter names are case-insensitive, spaces around "=" are allowed, and
    quoted values may contain commas and backslash escapes. Malformed parts are skipped.
    """
    challenges: list[Challenge] = []
    for header in headers:
        challenges.extend(_parse_header(header))
    return challenges


def _parse_header(text: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    position = 0
    while position < len(text):
        position = _skip(text, position, _SPACE + ",")
        match = _TOKEN.match(text, position)
        if match is None:
            position += 1
            continue

        after = _skip(text, match.end(), _SPACE)
        is_param = after < len(text) and text[after] == "=" and bool(challenges)
        if not is_param:
            challenges.append(Challenge(match.group().lower()))
            position = after
            continue
        value, position = _read_value(text, _skip(text, after + 1, _SPACE))
        challenges[-1].params[match.group().lower()] = value
    return challenges


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _read_value(text: str, position: int) -> tuple[str, int]:
    """Read a quoted-string or a bare value starting at `position`."""
    if position < len(text) and text[position] == '"':
        return _read_quoted(text, position + 1)
    end = position
    while end < len(text) and text[end] not in _SPACE + ",":
        end += 1
    return text[position:end], end


def _read_quoted(text: str, position: int) -> tuple[str, int]:
    characters: list[str] = []
    while position < len(text):
        character = text[position]
        if character == "\\" and position + 1 < len(text):
            characters.append(text[position + 1])
            position += 2
            continue
        if character == '"':
            return "".join(characters), position + 1
        characters.append(character)
        position += 1
    return "".join(characters), position
