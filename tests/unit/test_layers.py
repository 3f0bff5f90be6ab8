"""The import rules of DESIGN.md ("who may import what"): the import-linter contracts in
pyproject.toml ``[tool.importlinter]``, run here so that ``pytest`` alone fails on a broken one.

import-linter cannot see *where* an import sits, so one rule is not a contract: KFP components
import imtext only inside their bodies (which run in the image), never at module level. The AST
test ``tests/unit/test_pipeline_compile.py::
test_components_import_kfp_at_module_level_and_imtext_only_in_bodies`` holds that one.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def test_import_contracts_are_kept():
    # This tree's imtext first, whatever copy the environment has installed.
    path = os.pathsep.join(
        filter(None, [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")])
    )
    done = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
