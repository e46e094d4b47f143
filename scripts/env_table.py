"""Print the README's "Environment variables" table from the one table of settings (qwen_worker.config.VARIABLES);
with --write, put it into README.md in place of the current one. tests/test_docs.py fails while the two differ.

    .venv/bin/python scripts/env_table.py [--write]     (or: make env-table)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from qwen_worker.config import readme_table  # noqa: E402

HEADING = "## Environment variables"


def replace_table(readme: str, table: str) -> str:
    """``readme`` with the first Markdown table after HEADING replaced by ``table``."""
    lines = readme.splitlines(keepends=True)
    start = lines.index(HEADING + "\n")
    first = next(index for index in range(start + 1, len(lines)) if lines[index].startswith("|"))
    end = first
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:first]) + table + "".join(lines[end:])


def main(argv: list[str]) -> int:
    table = readme_table()
    if argv == ["--write"]:
        path = ROOT / "README.md"
        path.write_text(replace_table(path.read_text(), table))
    elif argv:
        print(__doc__, file=sys.stderr)
        return 2
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
