"""The README's tables are the user's reference: they must name every request field and alias the schema accepts,
and every environment variable the configuration reads, and nothing that does not exist."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen_worker import schema
from qwen_worker.config import VARIABLES, Settings, readme_table

README = Path(__file__).resolve().parent.parent / "README.md"

# Read by the runpod SDK itself, not by the worker's config; documented because operators and tests set them.
READ_BY_THE_SDK = {var.name for var in VARIABLES if var.read_by == "sdk"}


def table_after(heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``heading``."""
    lines = README.read_text().splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # after the header and the |---| line


def names_in(cell: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cell))


def test_parameter_table_names_every_field_and_alias_and_nothing_else():
    documented: set[str] = set()
    for row in table_after("### Parameters"):
        documented |= names_in(row[0]) | names_in(row[1])
    assert documented == set(schema._FIELDS)


def test_parameter_table_lists_each_alias_beside_its_field():
    rows = {frozenset(names_in(row[0])): names_in(row[1]) for row in table_after("### Parameters")}
    for canonical, aliases in schema._ALIASES.items():
        assert rows.get(frozenset({canonical})) == set(aliases) - {canonical}, canonical


class RecordingEnv(dict[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        self.read.add(str(name))
        return super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("config must read variables by name, not scan the environment")


def variables_read() -> set[str]:
    """Every variable Settings.from_env looks up, including those read only when a bucket is configured."""
    env = RecordingEnv(
        {
            "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9",
            "BUCKET_ACCESS_KEY_ID": "id",
            "BUCKET_SECRET_ACCESS_KEY": "secret",
            "BUCKET_NAME": "b",
        }
    )
    Settings.from_env(env)
    return env.read


def test_environment_table_names_every_variable_the_config_reads_and_nothing_else():
    documented: set[str] = set()
    for row in table_after("## Environment variables"):
        documented |= names_in(row[0])
    read = variables_read()
    assert "DEFAULT_STEPS" in read and "BUCKET_REGION" in read  # the recording sees reads
    assert read - documented == set(), "read by config.py but missing from the README's table"
    assert documented - read - READ_BY_THE_SDK == set(), "in the README's table but read by nobody"


def test_environment_table_is_the_one_table_of_settings_in_every_column():
    """The README's table is rendered from config.VARIABLES: name, default, values (type, range, choices) and doc.
    Regenerate it with `make env-table` (scripts/env_table.py --write)."""
    lines = README.read_text().splitlines()
    start = lines.index("## Environment variables")
    first = next(index for index in range(start, len(lines)) if lines[index].startswith("|"))
    end = next(index for index in range(first, len(lines)) if not lines[index].startswith("|"))
    assert "\n".join(lines[first:end]) + "\n" == readme_table(), "run `make env-table` (scripts/env_table.py --write)"
    rows = table_after("## Environment variables")
    assert [row[0] for row in rows] == [f"`{var.name}`" for var in VARIABLES]


def test_every_variable_read_is_a_row_and_every_row_is_read():
    """from_env reads exactly the table's worker-read rows: no variable read outside the table."""
    assert variables_read() == {var.name for var in VARIABLES if var.read_by == "worker"}
