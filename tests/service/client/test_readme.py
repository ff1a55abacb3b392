"""The README's raw-block client example runs verbatim against a real server (only its target changes)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def raw_block_example() -> str:
    """The README's Python block that puts and gets raw blocks (no transformers)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if "kv.put(ns, ids, blocks" in b and "hf." not in b]
    assert len(found) == 1, "the README's raw-block example is gone"
    return found[0]


def test_readme_raw_block_example_runs(shared_server):
    code = raw_block_example()
    assert '"127.0.0.1:50051"' in code
    exec(compile(code.replace('"127.0.0.1:50051"', repr(shared_server.target)), str(README), "exec"), {})
