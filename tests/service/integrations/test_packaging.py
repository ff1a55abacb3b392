"""Dependencies by role and import names: what a server or client process imports, and the installed package.

Each check runs a fresh interpreter (the venv's) so this test process's own imports cannot hide a leak.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Modules only the ``hf`` extra brings: a server or client process must not need them.
HF_ONLY = ("transformers", "gguf", "accelerate", "safetensors", "huggingface_hub")


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_server_and_client_import_nothing_from_the_hf_extra(tmp_path):
    out = _run("import sys, json\n"
               "import kvtier.service.server.app, kvtier.service.client, kvtier.service.client.client\n"
               f"print(json.dumps([m for m in {HF_ONLY!r} if m in sys.modules]))", tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_installed_package_imports_from_outside_the_checkout(tmp_path):
    out = _run("import importlib.util, json\n"
               "import kvtier.service.client, kvtier.tiering.keys\n"
               "print(json.dumps([kvtier.tiering.keys.__file__,\n"
               "                  [importlib.util.find_spec(n) is not None for n in ('service', 'tiering')]]))",
               tmp_path)
    assert out.returncode == 0, out.stderr
    keys_file, top_level = json.loads(out.stdout)
    assert keys_file.endswith("keys.py") and not keys_file.startswith(str(tmp_path))
    assert top_level == [False, False], "the folders must not be importable as top-level `service`/`tiering`"
