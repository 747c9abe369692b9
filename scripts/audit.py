#!/usr/bin/env python3
"""``make audit``: known vulnerabilities in the pinned Python requirements and the npm lockfiles.

    .venv/bin/python scripts/audit.py [--pnpm .tools/node_modules/.bin/pnpm] [--require-database]

Runs ``pip-audit`` (PyPI's vulnerability data) on requirements_production.txt + requirements-dev.txt
(exact pins, so ``--no-deps --disable-pip``: nothing is installed or resolved) and ``pnpm audit`` on
each pnpm lockfile. Both need a vulnerability database on the internet. Why this wrapper instead of
calling them from the Makefile: neither tool says "offline" plainly. Without pypi.org's JSON API,
pip-audit skips every package ("Dependency not found on PyPI") and still prints "No known
vulnerabilities found" with exit 0; without the npm audit endpoint, pnpm exits 1, exactly as it does
when it finds something. So each answer is classified here:

* checked, nothing found / checked, found something (printed; exit 1);
* could not reach the database (said plainly; exit 0: nothing could be checked, nothing was found);
* the tool failed for another reason (exit 1: a broken audit must not pass silently).

The GitHub workflow (.github/workflows/ci.yml) runs this on every push and weekly, where both
databases are reachable, with ``--require-database``: there an unreachable database fails the job,
so that a scan that checked nothing never passes for one that found nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("requirements_production.txt", "requirements-dev.txt")
LOCKFILE_DIRS = ("impetus-dashboard", "tests/clients/node")

# What requests/urllib3 (pip-audit) and undici/pnpm print when the network or the endpoint is not there.
UNREACHABLE = re.compile(
    r"ConnectionError|NameResolutionError|Max retries exceeded|Failed to resolve|Name or service not known|"
    r"Temporary failure in name resolution|Network is unreachable|Connection refused|ProxyError|"
    r"ReadTimeout|ConnectTimeout|ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|"
    r"ERR_PNPM_AUDIT_BAD_RESPONSE|ERR_PNPM_AUDIT_ENDPOINT_NOT_EXISTS|ERR_PNPM_FETCH|UNABLE_TO_GET_ISSUER_CERT"
)


@dataclass
class Result:
    """One audit's outcome: ``status`` is 'clean', 'found', 'unreachable' or 'error'."""

    name: str
    status: str
    detail: str


def classify_pip_audit(returncode: int, report: str, stderr: str) -> tuple[str, str]:
    """pip-audit's JSON report (``-f json``) and stderr -> (status, detail)."""
    try:
        dependencies = json.loads(report)["dependencies"] if report.strip() else None
    except (ValueError, KeyError, TypeError):
        dependencies = None
    if dependencies is None:
        if UNREACHABLE.search(stderr):
            return "unreachable", _last_line(stderr)
        return "error", f"exit {returncode}: {_last_line(stderr) or 'no report'}"
    vulnerable = [
        f"{d['name']} {d['version']}: " + ", ".join(v["id"] for v in d["vulns"]) for d in dependencies if d.get("vulns")
    ]
    skipped = [d["name"] for d in dependencies if d.get("skip_reason")]
    if vulnerable:
        return "found", "; ".join(vulnerable)
    if dependencies and len(skipped) == len(dependencies):
        # Every pin is a PyPI package: none found means the service did not answer, not a clean bill.
        return "unreachable", f"the PyPI vulnerability service answered for none of {len(skipped)} packages"
    checked = len(dependencies) - len(skipped)
    return "clean", f"{checked} packages checked" + (
        f" ({len(skipped)} not checked: {', '.join(skipped)})" if skipped else ""
    )


def classify_pnpm_audit(returncode: int, stdout: str, stderr: str) -> tuple[str, str]:
    """``pnpm audit --json``'s stdout and stderr -> (status, detail)."""
    try:
        report = json.loads(stdout)
        counts = report["metadata"]["vulnerabilities"]
    except (ValueError, KeyError, TypeError):
        text = stdout + "\n" + stderr
        if UNREACHABLE.search(text):
            return "unreachable", _last_line(text)
        return "error", f"exit {returncode}: {_last_line(text) or 'no report'}"
    found = {level: n for level, n in counts.items() if n}
    if found:
        return "found", ", ".join(f"{n} {level}" for level, n in found.items())
    return "clean", f"{report['metadata'].get('totalDependencies', '?')} packages checked"


def _last_line(text: str) -> str:
    lines = [line.strip(" │×") for line in text.strip().splitlines() if line.strip(" │×")]
    return " ".join(lines[-2:])[:300] if lines else ""


def run_pip_audit() -> Result:
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--no-deps",
        "--disable-pip",
        "--progress-spinner",
        "off",
        "-f",
        "json",
    ]
    for name in REQUIREMENTS:
        command += ["-r", str(ROOT / name)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return Result(
        "pip-audit " + " + ".join(REQUIREMENTS), *classify_pip_audit(done.returncode, done.stdout, done.stderr)
    )


def run_pnpm_audit(pnpm: str, folder: str) -> Result:
    done = subprocess.run(
        [pnpm, "--dir", folder, "audit", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    return Result(
        f"pnpm audit {folder}/pnpm-lock.yaml", *classify_pnpm_audit(done.returncode, done.stdout, done.stderr)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pnpm", default=str(ROOT / ".tools" / "node_modules" / ".bin" / "pnpm"))
    parser.add_argument(
        "--require-database",
        action="store_true",
        help="fail when a vulnerability database cannot be reached (CI, which has the internet)",
    )
    args = parser.parse_args(argv)
    results = [run_pip_audit()]
    for folder in LOCKFILE_DIRS:
        if (ROOT / folder / "pnpm-lock.yaml").is_file():
            results.append(run_pnpm_audit(args.pnpm, folder))
    for result in results:
        label = {"clean": "ok", "found": "VULNERABLE", "unreachable": "NOT CHECKED", "error": "FAILED"}[result.status]
        print(f"{label:12} {result.name}: {result.detail}")
    if any(r.status == "unreachable" for r in results):
        print(
            "\nCould not reach the vulnerability database for the checks marked NOT CHECKED (this machine has "
            "no route to it): nothing was found because nothing could be checked. The GitHub workflow runs "
            "`make audit` on every push and weekly."
        )
    failing = ("found", "error", "unreachable") if args.require_database else ("found", "error")
    return 1 if any(r.status in failing for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
