"""The layering (.importlinter, drawn in docs/architecture.md) holds, and breaks when a forbidden import is added.

import-linter reads the imports of config/, streaming/ and quotas/ without running them. The second test copies
the three packages, adds one forbidden import to the copy and checks that the contract it breaks is reported.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from bench.servers import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("config", "streaming", "quotas")


def lint(root: Path):
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_every_contract_is_kept():
    result = lint(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_exactly_one_module_imports_openai_and_one_imports_redis():
    # `protected` contracts allow the importer; these say the importer is really there (one, not none).
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True)
    assert graph.find_modules_that_directly_import("openai") == {"streaming.provider.client"}
    assert graph.find_modules_that_directly_import("redis") == {"quotas.store.redis"}
    assert graph.find_modules_that_directly_import("tiktoken") == {"quotas.domain.tokens"}


@pytest.mark.parametrize("module, line, broken", [
    ("quotas/domain/policy.py", "import streaming.errors", "quotas never imports streaming"),
    ("quotas/store/base.py", "from quotas.domain import policy", "quotas: the operators' console over the domain"),
    ("streaming/provider/retries.py", "from streaming.streams import relay", "streaming: the gateway over"),
    ("streaming/server/reactor.py", "import streaming.gateway.views", "stand apart from the gateway"),
    ("streaming/streams/buffer.py", "import openai", "Exactly one module imports openai"),
    ("quotas/domain/policy.py", "import tiktoken", "Only the meter's tokenizer module imports tiktoken"),
    ("quotas/domain/leases.py", "import redis", "Only the Redis counter store imports redis"),
    # A cycle between two modules of one package: streaming.errors already imports streaming.provider.errors.
    ("streaming/provider/errors.py", "import streaming.errors", "No import cycle"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, broken):
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / ".importlinter", tmp_path)
    with open(tmp_path / module, "a") as source:
        source.write(f"\n{line}  # added by the test\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(broken in name for name in broken_contracts(result.stdout)), result.stdout


def broken_contracts(report: str) -> list[str]:
    """The names of the contracts lint-imports reported BROKEN (it wraps long names over lines)."""
    results = report.split("dependencies.", 1)[1].split("Contracts:", 1)[0].strip().strip("-")
    parts = re.split(r"\s(KEPT|BROKEN)\s", " ".join(results.split()) + " ")
    return [" ".join(name.split()) for name, state in zip(parts[::2], parts[1::2]) if state == "BROKEN"]
