#!/usr/bin/env python3
"""Write the published JSON Schemas from their declaration (src/qwen_worker/contract.py): `make schema`.

schema/request.schema.json describes a job's input, schema/result.schema.json its output (a result or a dry-run
quote). tests/test_contract.py fails when a committed file differs from what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qwen_worker.contract import dumps, request_schema, result_schema

ROOT = Path(__file__).resolve().parent.parent
FILES = {"request.schema.json": request_schema, "result.schema.json": result_schema}


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "schema"
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in FILES.items():
        (folder / name).write_text(dumps(build()))
        print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
