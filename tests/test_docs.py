"""The documentation against the code: the settings table in docs/operations.md
names exactly the variables shared/config.py reads, each with the default the
code has, and every relative link in README.md and docs/*.md leads to a file
(and heading) that exists.

Each checker returns a list of problems, one readable line each, so a failure
says which row or link is wrong; each is also run on doctored text, to show it
can fail at all.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import socket
from dataclasses import fields
from pathlib import Path

import pytest

from harness import REPO_ROOT
from image_result_client.flow import default_shm_budget
from shared import config
from shared.config import Settings

pytestmark = pytest.mark.fast  # in-process: make test-fast

OPERATIONS = REPO_ROOT / "docs" / "operations.md"
TABLE_HEADER = re.compile(r"^\|\s*variable\s*\|\s*default\s*\|\s*meaning\s*\|\s*$")
# Defaults the code computes on the machine it runs on, as the table words them.
COMPUTED_DEFAULTS = {
    "the CPU count": lambda: os.cpu_count() or 1,
    "the host name": lambda: socket.gethostname() or "localhost",
    "half the size of /dev/shm": default_shm_budget,
}


# ---------------------------------------------------------------- which variables the code reads


def _variables_in(node: ast.AST) -> set[str]:
    """Names passed as the first argument of `get(...)` or `env.get(...)` below `node`."""
    found = set()
    for call in ast.walk(node):
        if not (isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Constant)):
            continue
        func = call.func
        is_get = isinstance(func, ast.Name) and func.id == "get"
        is_env_get = (
            isinstance(func, ast.Attribute) and func.attr == "get"
            and isinstance(func.value, ast.Name) and func.value.id == "env"
        )
        if (is_get or is_env_get) and isinstance(call.args[0].value, str):
            found.add(call.args[0].value)
    return found


def variables_read_by_code() -> dict[str, str]:
    """Environment variable -> Settings field, read from the source of
    shared.config._parse: each keyword of its `Settings(...)` call, and the
    variables its value (or the local it names) is read from."""
    function = ast.parse(inspect.getsource(config._parse)).body[0]
    locals_read: dict[str, set[str]] = {}
    settings_call = None
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            locals_read.setdefault(node.targets[0].id, set()).update(_variables_in(node.value))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Settings":
            settings_call = node
    assert settings_call is not None, "shared.config._parse no longer builds Settings(...): update this test"
    mapping: dict[str, str] = {}
    for keyword in settings_call.keywords:
        names = set(_variables_in(keyword.value))
        if isinstance(keyword.value, ast.Name):
            names |= locals_read.get(keyword.value.id, set())
        assert len(names) == 1, f"cannot tell which variable sets Settings.{keyword.arg}: {sorted(names)}"
        mapping[names.pop()] = keyword.arg
    assert sorted(mapping.values()) == sorted(f.name for f in fields(Settings)), (
        "_parse does not set every field of Settings exactly once"
    )
    return mapping


def test_the_code_reader_finds_every_setting() -> None:
    mapping = variables_read_by_code()
    assert mapping["JPEG_QUALITY"] == "jpeg_quality"
    assert mapping["WORKERS"] == "workers"  # read into a local first
    assert mapping["SHM_NAME_PREFIX"] == "shm_name_prefix"  # read with env.get
    assert len(mapping) == len(fields(Settings))
    # What launchers clear from their environment (harness.pool.POOL_ENV_VARS): the same names.
    assert sorted(config.setting_names()) == sorted(mapping)


# ---------------------------------------------------------------- the settings table


def settings_table(markdown: str) -> list[tuple[str, str]]:
    """(variable cell, default cell) of each row of the `| variable | default | meaning |` table."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if TABLE_HEADER.match(line)), None)
    if start is None:
        return []
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append((cells[0], cells[1] if len(cells) > 1 else ""))
    return rows


def _code_default(field: str) -> object:
    return getattr(Settings.from_env({}, dotenv_path=None), field)


def _default_problem(variable: str, field: str, cell: str) -> str | None:
    """Why the table's default for `variable` is not the code's, or None."""
    actual = _code_default(field)
    literal = re.fullmatch(r"`([^`]*)`(.*)", cell)
    if literal:
        try:
            documented = getattr(Settings.from_env({variable: literal.group(1)}, dotenv_path=None), field)
        except config.ConfigError as exc:
            return f"{variable}: the documented default {literal.group(1)!r} is refused by the code: {exc}"
        if documented != actual:
            return f"{variable}: the table says {literal.group(1)!r}, the code's default is {actual!r}"
        return None
    if cell.startswith("empty"):
        if actual not in ((), None, ""):
            return f"{variable}: the table says empty, the code's default is {actual!r}"
        return None
    for words, compute in COMPUTED_DEFAULTS.items():
        if cell == words:
            expected = compute()
            return None if actual == expected else f"{variable}: the table says {words}, the code gives {actual!r}"
    return f"{variable}: cannot read the default {cell!r}; write `value`, empty, or one of {sorted(COMPUTED_DEFAULTS)}"


def settings_table_problems(markdown: str) -> list[str]:
    rows = settings_table(markdown)
    if not rows:
        return ["no `| variable | default | meaning |` table found"]
    code = variables_read_by_code()
    problems, seen = [], set()
    for variable_cell, default_cell in rows:
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", variable_cell)
        if not name:
            problems.append(f"row {variable_cell!r}: the first cell must be one variable, like `JPEG_QUALITY`")
            continue
        variable = name.group(1)
        if variable in seen:
            problems.append(f"{variable}: listed twice")
        seen.add(variable)
        if variable not in code:
            problems.append(f"{variable}: the table lists it, but shared/config.py does not read it")
            continue
        problem = _default_problem(variable, code[variable], default_cell)
        if problem:
            problems.append(problem)
    problems.extend(
        f"{variable}: shared/config.py reads it (Settings.{field}), but the table does not list it"
        for variable, field in sorted(code.items())
        if variable not in seen
    )
    return problems


def test_settings_table_matches_the_code() -> None:
    assert settings_table_problems(OPERATIONS.read_text()) == []


def test_settings_check_catches_wrong_missing_and_unknown_rows() -> None:
    real = OPERATIONS.read_text()
    doctored = (
        real.replace("| `JPEG_QUALITY` | `80` |", "| `JPEG_QUALITY` | `90` |")
        .replace("| `LEASE_TTL` |", "| `LEASE_TTL_SECONDS` |")
        .replace("| `URL_ALLOWED_HOSTS` | empty |", "| `URL_ALLOWED_HOSTS` | any |")
        .replace("| `HOST_ID` | the host name |", "| `HOST_ID` | `localhost-not-this-one` |")
    )
    assert doctored != real
    # Only what the doctoring added: the real table's own problems have their own test.
    baseline = settings_table_problems(real)
    problems = [problem for problem in settings_table_problems(doctored) if problem not in baseline]
    assert "JPEG_QUALITY: the table says '90', the code's default is 80" in problems
    assert "LEASE_TTL_SECONDS: the table lists it, but shared/config.py does not read it" in problems
    assert "LEASE_TTL: shared/config.py reads it (Settings.lease_ttl), but the table does not list it" in problems
    assert any(p.startswith("URL_ALLOWED_HOSTS: cannot read the default 'any'") for p in problems)
    assert any(p.startswith("HOST_ID: the table says 'localhost-not-this-one'") for p in problems)
    assert len(problems) == 5, problems
    assert settings_table_problems("# Operations\n\nno table here\n") == [
        "no `| variable | default | meaning |` table found"
    ]


def test_a_refused_default_is_reported_not_raised() -> None:
    table = "| variable | default | meaning |\n|---|---|---|\n| `JPEG_QUALITY` | `500` | |\n"
    problems = settings_table_problems(table)
    assert any(p.startswith("JPEG_QUALITY: the documented default '500' is refused by the code") for p in problems)


# ---------------------------------------------------------------- links


INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _without_code(markdown: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked."""
    kept, fenced = [], None
    for line in markdown.splitlines():
        marker = FENCE.match(line.lstrip())
        if marker:
            fenced = None if fenced == marker.group(1) else (fenced or marker.group(1))
            kept.append("")
            continue
        kept.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(kept)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page (lower case, punctuation
    dropped, spaces to hyphens, -1, -2... for repeats)."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = None
    for line in markdown.splitlines():
        marker = FENCE.match(line.lstrip())
        if marker:
            in_fence = None if in_fence == marker.group(1) else (in_fence or marker.group(1))
            continue
        heading = HEADING.match(line) if not in_fence else None
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        repeat = counts.get(slug, 0)
        counts[slug] = repeat + 1
        anchors.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return anchors


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file, or heading anchor, does not exist."""
    text = _without_code(page.read_text())
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.IGNORECASE) or target.startswith("//"):
            continue  # http:, https:, mailto:...: not a file of this repository
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        shown = f"{page.relative_to(REPO_ROOT) if page.is_relative_to(REPO_ROOT) else page.name}: ({target})"
        if not destination.exists():
            problems.append(f"{shown} leads to {path_part}, which does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination.read_text()):
            problems.append(f"{shown}: {destination.name} has no heading with the anchor #{anchor}")
    return problems


def documentation_pages() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def test_documentation_pages_exist() -> None:
    names = {page.relative_to(REPO_ROOT).as_posix() for page in documentation_pages()}
    for expected in ("README.md", "docs/design.md", "docs/operations.md", "docs/performance.md"):
        assert expected in names


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert broken_links(page) == []


def test_link_check_catches_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## The order of durable steps\n\n## Repeat\n\n## Repeat\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#the-order-of-durable-steps) [second repeat](other.md#repeat-1)\n"
        "[own heading](#page) [web](https://example.com/missing.md) [mail](mailto:a@b.c)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading) ![image](pictures/gone.png)\n"
        "[ref]: ./also-gone.md\n"
        "`[not a link](inside-code.md)`\n"
        "```\n[not a link either](inside-fence.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert any("(missing.md) leads to missing.md" in p for p in problems)
    assert any("(other.md#no-such-heading): other.md has no heading with the anchor #no-such-heading" in p for p in problems)
    assert any("(pictures/gone.png)" in p for p in problems)
    assert any("(./also-gone.md)" in p for p in problems)


def test_readme_keeps_the_quick_start_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for command in ("make run", "make test", "make demo"):
        assert command in readme


def docker_runs(markdown: str) -> list[str]:
    """Every `docker run` command in the page's shell blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", markdown, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("docker run")]
    return commands


def container_names_without_a_network(markdown: str) -> list[str]:
    """`docker run` commands that reach Redis by a container's name (not an
    address, not localhost) with no --network: on Docker's default bridge the
    name does not resolve, and the pool waits for Redis forever."""
    problems = []
    for run in docker_runs(markdown):
        host = re.search(r"REDIS_URL=rediss?://(?:[^@\s]*@)?([A-Za-z][\w.-]*)", run)
        if host and host.group(1) != "localhost" and "--network" not in run:
            problems.append(run)
    return problems


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda page: page.name)
def test_docker_run_examples_that_name_a_redis_container_put_both_on_a_network(page: Path) -> None:
    assert container_names_without_a_network(page.read_text()) == []


def test_the_docker_run_check_catches_a_missing_network() -> None:
    page = "```sh\ndocker run -d --ipc=host \\\n  -e REDIS_URL=redis://redis:6379 image-result-worker\n```\n"
    assert len(container_names_without_a_network(page)) == 1
    assert container_names_without_a_network(page.replace("--ipc=host", "--network irw --ipc=host")) == []
    assert container_names_without_a_network(page.replace("redis://redis", "redis://10.0.0.5")) == []
