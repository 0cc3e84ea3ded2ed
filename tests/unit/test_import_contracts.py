"""The import rules of docs/architecture.md, enforced: import-linter's contracts from
pyproject.toml ([tool.importlinter]) run here, so `make test` and CI fail on a violation.

Also checked here: the "only" rules hold for every server module, including ones added after the
contract's list was written (grimp's graph, no list to maintain), no module imports another module's private (``_name``) functions, and the checker
itself reports a violation when there is one.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]

#: contracts broken by files their owners are still changing: strict xfail, so the marker must go
#: as soon as the contract holds (XPASS fails the run).
KNOWN_BROKEN: dict[str, str] = {
}

#: "only" contracts: the server packages the source may import (directly or through others)
ONLY_ALLOWED = {
    "store-only": {"store", "errors"},
    "training-only": {"store", "basemodel", "errors", "native"},
    "client-only": {"grpc_client"},
}

#: cross-module imports of private names that owners still have to remove: (file, module, name)
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def _lint_imports(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    return subprocess.run([*command, "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report() -> str:
    result = _lint_imports()
    assert "Contracts:" in result.stdout, result.stdout + result.stderr  # it ran and checked something
    return result.stdout


def _status(report: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)} (KEPT|BROKEN)$", report, re.MULTILINE)
    assert match, f"contract {name!r} is not in lint-imports' report"
    return match.group(1)


def _broken_details(report: str, name: str) -> str:
    start = report.find(f"{name}\n{'-' * len(name)}")
    return report[start:] if start >= 0 else report


@pytest.mark.parametrize(
    "contract",
    [pytest.param(c, id=c["id"], marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[c["id"]])] if c["id"] in KNOWN_BROKEN else []) for c in CONTRACTS],
)
def test_contract_is_kept(report, contract):
    assert _status(report, contract["name"]) == "KEPT", _broken_details(report, contract["name"])


@pytest.fixture(scope="module")
def graph():
    import grimp

    return grimp.build_graph("loraplex.server", "loraplex.training", cache_dir=None)


def _package_of(module: str) -> str:
    """``loraplex.server.x`` for any module inside it (``loraplex.server`` itself for the root)."""
    return ".".join(module.split(".")[:3])


@pytest.mark.parametrize("contract_id", sorted(ONLY_ALLOWED))
def test_only_rules_hold_for_every_server_module(graph, contract_id):
    """The "only" contracts, checked without a list to keep up to date: everything the source
    imports, directly or not, lies in the allowed server packages (a module added later counts)."""
    contract = next(c for c in CONTRACTS if c["id"] == contract_id)
    allowed = {f"loraplex.server.{name}" for name in ONLY_ALLOWED[contract_id]} | {"loraplex.server"}
    outside = {}
    for source in contract["source_modules"]:
        for imported in graph.find_upstream_modules(source, as_package=True):
            if imported.startswith("loraplex.server") and _package_of(imported) not in allowed:
                outside[imported] = graph.find_shortest_chain(importer=source, imported=imported)
    assert not outside, f"{contract_id}: imports outside {sorted(allowed)}: {outside}"


def _private_imports() -> set[tuple[str, str, str]]:
    found = set()
    for folder in ("server", "training"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loraplex"):
                    for alias in node.names:
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            found.add((str(path.relative_to(ROOT)), node.module, alias.name))
    return found


def test_no_module_imports_another_modules_private_names():
    found = _private_imports()
    assert not (found - KNOWN_PRIVATE_IMPORTS), f"private names imported across modules (make them public or move them): {sorted(found - KNOWN_PRIVATE_IMPORTS)}"
    assert not (KNOWN_PRIVATE_IMPORTS - found), f"fixed, remove from KNOWN_PRIVATE_IMPORTS: {sorted(KNOWN_PRIVATE_IMPORTS - found)}"


def test_the_checker_reports_a_violation(tmp_path):
    """A contract the code breaks on purpose (the fronts import the service) must be BROKEN."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["loraplex.server"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "api may not import the service"\ntype = "forbidden"\n'
        'source_modules = ["loraplex.server.api"]\nforbidden_modules = ["loraplex.server.service"]\n'
    )
    result = _lint_imports(str(config))
    assert result.returncode != 0
    assert "api may not import the service BROKEN" in result.stdout
