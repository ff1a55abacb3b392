"""What ops/Dockerfile and ops/docker-compose*.yml give a kvtier container, read without a Docker
engine: the environment (image ENV, then compose ``environment``), the argv (ENTRYPOINT + CMD, or the
compose overrides), the health check, the bind mounts and the published ports.

Parses the subset the shipped files use (``ENV k=v ...`` with ``\\`` continuations, JSON-array
``ENTRYPOINT``/``CMD``/``HEALTHCHECK CMD``, compose mappings and lists); anything else is an error, so a
reshaped file fails the tests instead of being misread.
"""

from __future__ import annotations

import json
import pathlib
import shlex
from dataclasses import dataclass, field

OPS = pathlib.Path(__file__).resolve().parents[2] / "ops"


@dataclass
class Dockerfile:
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    expose: set[int] = field(default_factory=set)
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest), in order


def _logical_lines(text: str):
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield (buf + line).strip()
        buf = ""


def _json_list(text: str, what: str) -> list[str]:
    value = json.loads(text)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{what} must be a JSON list of strings: {text}")
    return value


def parse_dockerfile(path: pathlib.Path) -> Dockerfile:
    out = Dockerfile()
    for line in _logical_lines(path.read_text()):
        inst, _, rest = line.partition(" ")
        inst = inst.upper()
        out.instructions.append((inst, rest.strip()))
        if inst == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"ENV must use key=value pairs: {line}")
                out.env[key] = value
        elif inst == "ENTRYPOINT":
            out.entrypoint = _json_list(rest, "ENTRYPOINT")
        elif inst == "CMD":
            out.cmd = _json_list(rest, "CMD")
        elif inst == "EXPOSE":
            out.expose |= {int(p.split("/")[0]) for p in rest.split()}
        elif inst == "HEALTHCHECK":
            out.healthcheck = _json_list(rest[rest.index("CMD ") + 4:], "HEALTHCHECK CMD")
    return out


@dataclass
class Container:
    """The kvtier container as compose would run it from the image."""

    env: dict[str, str]
    argv: list[str]
    healthcheck: list[str]
    binds: dict[str, pathlib.Path]  # container path → host path (relative to ops/)
    published: dict[int, int]  # container port → host port
    stop_grace_s: float


def _seconds(text: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * units[unit]
    return float(text)


def kvtier_container(compose: dict, image: Dockerfile, service: str = "kvtier") -> Container:
    """The kvtier ``service`` of ``compose`` (YAML anchors and merge keys already resolved by the loader)."""
    svc = compose["services"][service]
    env = dict(image.env)
    if not isinstance(svc.get("environment", {}), dict):
        raise ValueError(f"services.{service}.environment must be a mapping")
    env.update({k: str(v) for k, v in svc.get("environment", {}).items()})
    entrypoint = svc.get("entrypoint", image.entrypoint)
    # compose: an explicit entrypoint drops the image's CMD; a command replaces CMD
    cmd = svc.get("command", image.cmd if "entrypoint" not in svc else [])
    binds = {}
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            if vol.get("type") == "bind":
                binds[vol["target"]] = pathlib.Path(vol["source"])
        else:
            src, dst = vol.split(":")[:2]
            if src.startswith((".", "/")):
                binds[dst] = pathlib.Path(src)
    published = {}
    for p in svc.get("ports", []):
        parts = str(p).split(":")
        published[int(parts[-1])] = int(parts[-2])
    test = svc.get("healthcheck", {}).get("test", ["CMD", *image.healthcheck] if image.healthcheck else [])
    if test[:1] != ["CMD"]:
        raise ValueError(f"healthcheck test must be an exec-form CMD list: {test}")
    return Container(env=env, argv=[*entrypoint, *cmd], healthcheck=test[1:], binds=binds, published=published,
                     stop_grace_s=_seconds(str(svc.get("stop_grace_period", "10s"))))
