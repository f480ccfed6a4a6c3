"""The layout of docs/development.md ("Where things are") as rules on imports,
so that a new import that runs back up, or ties two siblings together, fails
here rather than in a reader's head.

    supervisor.py
      -> control/, workers/          (never each other)
         -> shared/state/, imaging/, output/, ipc/   (never each other)
            -> shared/ on its own floor: config, messages, the basics
               -> image_result_client/   (imports nothing of ours: it ships alone)

harness/, tools/, bench/, soak/ and tests/ use all of these; nothing shipped uses them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # in-process: make test-fast

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_PACKAGES = ("state", "imaging", "storage", "ipc")
OURS = ("supervisor", "control", "workers", "shared", "image_result_client", "harness", "tools", "bench", "soak", "tests")


def layer_of_module(module: str) -> str | None:
    """`shared.state.leases` -> "shared/state", `shared.config` -> "shared", `control.x` -> "control"."""
    parts = module.split(".")
    if parts[0] not in OURS:
        return None
    if parts[0] == "shared" and len(parts) > 1 and parts[1] in SHARED_PACKAGES:
        return f"shared/{parts[1]}"
    return parts[0]


def layer_of_file(path: Path) -> str:
    return layer_of_module(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))  # type: ignore[return-value]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from shared import colour` imports the module shared.colour (or shared.imaging's, by its path).
            found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return found


def allowed_layers(layer: str) -> set[str]:
    below_shared = {"shared", "image_result_client"}
    every_shared = below_shared | {f"shared/{name}" for name in SHARED_PACKAGES}
    return {
        "image_result_client": {"image_result_client"},
        "shared": below_shared,
        **{f"shared/{name}": below_shared | {f"shared/{name}"} for name in SHARED_PACKAGES},
        "control": every_shared | {"control"},
        "workers": every_shared | {"workers"},
        "supervisor": every_shared | {"control", "workers"},
    }[layer]


def shipped_files() -> list[Path]:
    files = [REPO_ROOT / "supervisor.py"]
    for folder in ("control", "workers", "shared", "image_result_client"):
        files.extend(sorted((REPO_ROOT / folder).rglob("*.py")))
    return files


def test_every_import_of_the_shipped_code_goes_down_the_layout() -> None:
    wrong = []
    for path in shipped_files():
        layer = layer_of_file(path)
        for module in imported_modules(path):
            target = layer_of_module(module)
            if target is not None and target not in allowed_layers(layer):
                wrong.append(f"{path.relative_to(REPO_ROOT)} ({layer}) imports {module} ({target})")
    assert len(shipped_files()) > 50 and not wrong, "\n".join(wrong)


def test_the_rules_catch_what_they_are_for() -> None:
    assert "control" not in allowed_layers("workers") and "workers" not in allowed_layers("control")
    assert "shared/imaging" not in allowed_layers("shared/state") and "shared/state" not in allowed_layers("shared")
    assert allowed_layers("image_result_client") == {"image_result_client"}
    assert layer_of_module("shared.state.leases") == "shared/state" and layer_of_module("shared.config") == "shared"
    assert layer_of_module("harness.pool") == "harness" and layer_of_module("redis") is None


def test_every_folder_of_shared_is_named_in_the_rules_and_the_map() -> None:
    folders = sorted(p.name for p in (REPO_ROOT / "shared").iterdir() if (p / "__init__.py").exists())
    assert folders == sorted(SHARED_PACKAGES)
    development = (REPO_ROOT / "docs" / "development.md").read_text()
    assert all(f"| `shared/{name}/` |" in development for name in folders)
