"""scripts/audit.py (`make audit`): an audit that could not reach its database says so and passes; one that
found something, or broke, fails. Samples are the tools' real output (pip-audit 2.10.1, pnpm 12)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _report(*dependencies: dict[str, object]) -> str:
    return json.dumps({"dependencies": list(dependencies), "fixes": []})


def test_pip_audit_with_every_package_skipped_is_unreachable(audit: ModuleType) -> None:
    # What pip-audit prints here, exit 0 and "No known vulnerabilities found", when pypi.org's JSON API 404s.
    report = _report(
        *(
            {"name": n, "skip_reason": f"Dependency not found on PyPI and could not be audited: {n} (1.0)"}
            for n in ("flask", "gunicorn")
        )
    )
    assert audit.classify_pip_audit(0, report, "No known vulnerabilities found")[0] == "unreachable"


def test_pip_audit_connection_error_is_unreachable(audit: ModuleType) -> None:
    stderr = (
        "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='api.osv.dev', port=443): Max retries "
        "exceeded with url: /v1/query (Caused by NameResolutionError(...))"
    )
    assert audit.classify_pip_audit(1, "", stderr)[0] == "unreachable"


def test_pip_audit_findings_and_clean_runs(audit: ModuleType) -> None:
    found = _report(
        {"name": "flask", "version": "0.12", "vulns": [{"id": "PYSEC-2018-66", "fix_versions": ["1.0"]}]},
        {"name": "gunicorn", "version": "27.0.1", "vulns": []},
    )
    assert audit.classify_pip_audit(1, found, "") == ("found", "flask 0.12: PYSEC-2018-66")
    clean = _report({"name": "flask", "version": "3.1.3", "vulns": []}, {"name": "x", "skip_reason": "not on PyPI"})
    status, detail = audit.classify_pip_audit(0, clean, "")
    assert status == "clean" and "1 packages checked" in detail and "x" in detail


def test_pip_audit_other_failures_fail(audit: ModuleType) -> None:
    assert audit.classify_pip_audit(2, "", "pip-audit: error: argument -r: can't open 'nope.txt'")[0] == "error"


def test_pnpm_audit(audit: ModuleType) -> None:
    offline = (
        "Error: ERR_PNPM_AUDIT_BAD_RESPONSE\n\n  × The audit endpoint (at https://registry.npmjs.org/-/npm/v1/"
        "security/\n  │ advisories/bulk) responded with 405:\n"
    )
    assert audit.classify_pnpm_audit(1, "", offline)[0] == "unreachable"
    counts = {"info": 0, "low": 0, "moderate": 2, "high": 1, "critical": 0}
    found = json.dumps({"advisories": {}, "metadata": {"vulnerabilities": counts, "totalDependencies": 300}})
    assert audit.classify_pnpm_audit(1, found, "") == ("found", "2 moderate, 1 high")
    clean = json.dumps({"metadata": {"vulnerabilities": dict.fromkeys(counts, 0), "totalDependencies": 300}})
    assert audit.classify_pnpm_audit(0, clean, "")[0] == "clean"
    assert audit.classify_pnpm_audit(1, "", "ERR_PNPM_NO_LOCKFILE  No pnpm-lock.yaml found")[0] == "error"


def test_the_real_pip_audit_runs_and_its_answer_is_understood(audit: ModuleType) -> None:
    """Offline this is 'unreachable', online 'clean' or 'found': never a report this script cannot read."""
    result = audit.run_pip_audit()
    assert result.status in ("unreachable", "clean", "found"), result.detail
