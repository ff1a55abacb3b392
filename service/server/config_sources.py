"""Where settings come from: the TOML file, ``KVTIER_*`` environment variables and flags, merged in order of
precedence, each leaf remembering its source so every error names it in one line. Imports pydantic only.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError


class SettingsError(ValueError):
    """An invalid or unknown setting: one line naming it, where it came from and (if unknown) the
    closest valid name."""


class Sources:
    """The layers of one settings model: its sections (sub-models) and top-level fields are read from the
    model itself, so a section added there is known here at once.

    :param model: the top-level settings model (sections are its ``BaseModel``-typed fields).
    :param prefix: the environment variables' prefix (``KVTIER_``).
    :param other_env: prefixed variables that are not settings (left alone), name -> what it is.
    """

    def __init__(self, model: type[BaseModel], prefix: str, other_env: Mapping[str, str]) -> None:
        self.sections: dict[str, type[BaseModel]] = {
            name: f.annotation for name, f in model.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
        self.top_fields = tuple(name for name in model.model_fields if name not in self.sections)
        self.prefix = prefix
        self.other_env = other_env

    def layers(self, path: Path | None, environ: Mapping[str, str], flags: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
        """TOML < env < flags merged into one nested dict, and where each leaf came from.

        :raises SettingsError: on a missing or unparsable file, an unknown name or bad JSON in an env var.
        """
        origin: dict[tuple[str, ...], str] = {}
        merged: dict[str, Any] = {}
        if path is not None:
            self.merge(merged, self.toml_layer(path, origin))
        self.merge(merged, self.env_layer(environ, origin))
        flags = _drop_none(flags)
        for loc in _leaves(flags):
            origin[loc] = "flag --" + loc[-1].replace("_", "-")
        self.merge(merged, flags)
        return merged, origin

    def toml_layer(self, path: Path, origin: dict) -> dict:
        if not path.is_file():
            raise SettingsError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: invalid TOML: {exc}") from None
        lines = _toml_lines(text)

        def where(*loc: str) -> str:
            for k in range(len(loc), 0, -1):
                if loc[:k] in lines:
                    return f"{path}:{lines[loc[:k]]}"
            return str(path)

        for key, value in data.items():
            if key in self.top_fields:
                origin[(key,)] = where(key)
                continue
            if key not in self.sections:
                raise _unknown(repr(key), where(key), _closest(key, (*self.sections, *self.top_fields)))
            if not isinstance(value, dict):
                raise SettingsError(f"{where(key)}: {key} must be a [{key}] table")
            model_fields = self.sections[key].model_fields
            for field in value:
                if field not in model_fields:
                    raise _unknown(f"{key}.{field}", where(key, field), _closest(field, model_fields))
                origin[(key, field)] = where(key, field)
        return data

    def env_layer(self, environ, origin: dict) -> dict:
        out: dict[str, Any] = {}
        for raw_name, value in sorted(environ.items()):
            name = raw_name.upper()
            if not name.startswith(self.prefix) or name in self.other_env:
                continue
            rest = name[len(self.prefix):].lower()
            where = f"env {raw_name}"
            if "__" in rest:
                section, _, field = rest.partition("__")
                if section not in self.sections:
                    near = _closest(section, self.sections)
                    raise _unknown(f"section {section!r}", where,
                                   near and f"{self.prefix}{near.upper()}__{field.upper()}")
                model_fields = self.sections[section].model_fields
                if field not in model_fields:
                    near = _closest(field, model_fields)
                    raise _unknown(f"{section}.{field}", where, near and f"{self.prefix}{section.upper()}__{near.upper()}")
                out.setdefault(section, {})[field] = _env_value(raw_name, value, model_fields[field].annotation)
                origin[(section, field)] = where
            elif rest in self.top_fields:
                out[rest] = value
                origin[(rest,)] = where
            elif rest in self.sections:  # a whole section as JSON
                out[rest] = _env_value(raw_name, value, dict[str, Any])
                origin[(rest,)] = where
            elif section := next((s for s in self.sections if rest.startswith(s + "_")), None):
                field = rest[len(section) + 1:]
                raise _unknown(f"{section}.{field}", where, f"{self.prefix}{section.upper()}__{field.upper()}")
            elif near := difflib.get_close_matches(rest, [*self.top_fields, *self.sections], n=1, cutoff=0.8):
                raise _unknown(repr(rest), where, f"{self.prefix}{near[0].upper()}")
            # else: not shaped like a setting (a tool's own variable, e.g. KVTIER_STRESS): not ours to judge
        return out

    def merge(self, into: dict, layer: dict) -> None:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict) and key in self.sections:
                self.merge(into[key], value)
            else:
                into[key] = value


def _closest(name: str, valid) -> str | None:
    found = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return found[0] if found else None


def _unknown(what: str, where: str, suggestion: str | None) -> SettingsError:
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return SettingsError(f"unknown setting {what} ({where}){hint}")


def _toml_lines(text: str) -> dict[tuple[str, ...], int]:
    """``(table..., key)`` and ``(table...)`` → 1-based line, for messages (plain tables and keys)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for n, line in enumerate(text.splitlines(), 1):
        if m := re.match(r"\s*\[\s*([^\]\s]+)\s*\]", line):
            table = tuple(p.strip().strip('"') for p in m.group(1).split("."))
            lines.setdefault(table, n)
        elif m := re.match(r'\s*("[^"]*"|[A-Za-z0-9_-]+)\s*=', line):
            lines.setdefault((*table, m.group(1).strip('"')), n)
    return lines


def _env_value(name: str, value: str, annotation: Any) -> Any:
    # dict and list fields take JSON, as pydantic-settings did; everything else is parsed by pydantic
    if getattr(annotation, "__origin__", None) in (dict, list):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"env {name}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return value


def describe(exc: ValidationError, origin: dict[tuple[str, ...], str]) -> str:
    """One line for the first error (plus how many more), naming the setting and its source."""
    errors = exc.errors(include_url=False, include_input=False)
    err = errors[0]
    loc = tuple(str(p) for p in err["loc"])
    source = next((origin[loc[:k]] for k in range(len(loc), 0, -1) if loc[:k] in origin), "default")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = err["msg"].replace("\n", " ")
    return f"invalid setting {'.'.join(loc)} ({source}): {msg}{more}"


def _leaves(values: dict, prefix: tuple[str, ...] = ()):
    for key, value in values.items():
        if isinstance(value, dict) and not prefix:
            yield from _leaves(value, (key,))
        else:
            yield (*prefix, key)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        elif value is None:
            continue
        out[key] = value
    return out
