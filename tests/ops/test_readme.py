"""The README's Python examples run as written, against a real server: every ```python block runs in
a fresh interpreter (its own temp working directory), with ``127.0.0.1:50051`` pointed at the test's
server. A block that cannot run here is preceded by ``<!-- readme-test: skip: <why> -->``."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<why>\S.*?)\s*-->")


def python_blocks() -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every ```python block, in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(before)
            out.append((start, "\n".join(lines[start:end]) + "\n", skip.group("why") if skip else None))
            i = end
        i += 1
    return out


BLOCKS = python_blocks()


def test_the_readme_has_runnable_python_examples():
    assert sum(why is None for _, _, why in BLOCKS) >= 2


def _params():
    # blocks that load SmolLM2 carry the `model` marker, like the other tests that load it
    return [pytest.param(line, code, why, id=f"README.md:{line}",
                         marks=[pytest.mark.model] if "load_smollm2" in code else []) for line, code, why in BLOCKS]


@pytest.mark.parametrize("line,code,why", _params())
def test_readme_python_block_runs(line, code, why, shared_server, tmp_path):
    if why is not None:
        pytest.skip(why)
    code = code.replace("127.0.0.1:50051", shared_server.target)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README.md:{line} failed:\n{done.stderr[-4000:]}"
