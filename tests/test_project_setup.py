"""A newcomer's first commands: the README's test command, its extras, and CI running it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import upstream

REPO = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


def test_the_dev_extra_holds_the_postgresql_driver_the_suite_uses() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev = project["optional-dependencies"]["dev"]
    assert any(re.match(r"psycopg\b", requirement) for requirement in dev)


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    command = _readme_block("Running the tests")
    ci = (REPO / ".ci" / "run").read_text()
    for step in command.split("&&"):
        assert step.strip() in ci, step
    assert "CIO_TEST_POSTGRES_URL" in ci and "-eq 5" in ci


def test_the_upstream_skip_reason_names_the_project_not_a_machine_path(
    tmp_path: Path,
) -> None:
    assert "/" not in upstream.MISSING_REASON.replace("shared/", "")
    # With the document named but absent, the tests that need it skip with that reason.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         str(REPO / "tests" / "test_semantic.py"), str(REPO / "tests" / "test_spec.py"),
         str(REPO / "tests" / "test_operations_e2e.py"), "-k", "upstream"],
        capture_output=True, text=True, cwd=tmp_path, timeout=240,
        env={**__import__("os").environ, upstream.ENV: str(tmp_path / "absent.json")},
    )
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips, result.stdout[-2000:]
    for line in skips:
        reason = line.split(": ", 1)[1] if ": " in line else line
        assert str(tmp_path) not in reason and "/work/" not in reason, line
        assert "cio_pipelines_api.json" in reason


def test_without_the_driver_the_postgresql_tests_skip_with_a_reason(tmp_path: Path) -> None:
    import os

    code = ("import sys; sys.modules['psycopg'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', "
            f"{str(REPO / 'tests' / 'test_postgres_workers.py')!r}]))")
    env = {k: v for k, v in os.environ.items() if k not in ("CIO_TEST_POSTGRES_URL", "CI")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "the PostgreSQL driver is not installed" in result.stdout
    assert " failed" not in result.stdout and " error" not in result.stdout
