"""The runpod SDK is imported in one place, without the extra Python interpreter its import would start."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fresh interpreter: every subprocess it starts is recorded, then the import named by argv[1] runs.
CHILD = r"""
import json, subprocess, sys
started = []
original = subprocess.Popen.__init__
def recording(self, args, *rest, **kwargs):
    started.append([str(arg) for arg in args] if isinstance(args, (list, tuple)) else [str(args)])
    original(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = recording
exec(sys.argv[1])
import cpuinfo
from runpod.serverless.utils import rp_debugger
print(json.dumps({"started": started, "processor": rp_debugger.PROCESSOR,
                  "restored": cpuinfo.get_cpu_info is cpuinfo.cpuinfo.get_cpu_info}))
"""


def import_in_child(statement: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, statement], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpuinfo_children(started: list[list[str]]) -> list[list[str]]:
    return [command for command in started if any("cpuinfo" in part for part in command)]


def test_the_sdk_import_starts_no_cpuinfo_interpreter_and_keeps_the_processor_name():
    plain = import_in_child("import runpod")  # the SDK as it comes: the child this module exists to avoid
    assert cpuinfo_children(plain["started"]), plain
    ours = import_in_child("from qwen_worker.runpod_sdk import runpod")
    assert cpuinfo_children(ours["started"]) == [], ours["started"]
    assert ours["restored"]  # py-cpuinfo itself is as it was for anything else that uses it
    from qwen_worker.runpod_sdk import cpu_brand

    assert ours["processor"] == cpu_brand()["brand_raw"]
    if plain["processor"] != "Unable to get processor info.":  # where py-cpuinfo finds a brand, ours is the same
        assert ours["processor"].split() == plain["processor"].split()


def test_no_module_but_runpod_sdk_imports_the_sdk():
    importers = []
    for path in [*sorted((ROOT / "src" / "qwen_worker").glob("*.py")), ROOT / "handler.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name == "runpod" or name.startswith("runpod.") for name in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert importers and all(place.startswith("src/qwen_worker/runpod_sdk.py:") for place in importers), importers
