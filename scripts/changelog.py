"""CHANGELOG.md's generated parts (towncrier does the rendering; this keeps the file and the fragments in step).

    python scripts/changelog.py --write          # the Unreleased section from the fragments in changes/
    python scripts/changelog.py --check          # exit 1 when that section is stale (tests/unit/test_changelog.py)
    python scripts/changelog.py --notes 1.2.0    # print the 1.2.0 section (the GitHub release's notes)

Why a section for unreleased work at all: Keep a Changelog asks for one, and a reader of main should see
what the next release holds without running towncrier. It lies between two markers, above towncrier's
own start marker, so `towncrier build` (make release) inserts the new version below it untouched.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANGELOG = ROOT / "CHANGELOG.md"
BEGIN, END = "<!-- unreleased start -->", "<!-- unreleased end -->"
EMPTY = "## [Unreleased]\n\nNothing yet: no fragment in changes/.\n"


def towncrier() -> list[str]:
    """The venv's towncrier (beside this interpreter), else whichever is on PATH."""
    beside = Path(sys.executable).parent / "towncrier"
    return [str(beside)] if beside.exists() else ["towncrier"]


def unreleased() -> str:
    """The pending fragments rendered as towncrier would, titled Unreleased (no date until released)."""
    result = subprocess.run(
        [*towncrier(), "build", "--draft", "--version", "Unreleased"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    body = result.stdout.strip("\n")  # the draft alone: towncrier's progress lines go to stderr
    if not body.startswith("## [Unreleased]") or "No significant changes." in body:
        return EMPTY
    body = re.sub(r"^## \[Unreleased\].*$", "## [Unreleased]", body, count=1, flags=re.M)
    body = re.sub(r"\n{3,}", "\n\n", body)
    return body.rstrip("\n") + "\n"


def replaced(text: str, section: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{CHANGELOG.name}: the markers {BEGIN} / {END} are missing")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def notes(version: str) -> str:
    """The body of ``## [version]``'s section, up to the next version's heading."""
    text = CHANGELOG.read_text()
    match = re.search(rf"^## \[{re.escape(version)}\][^\n]*\n(.*?)(?=^## \[|\Z)", text, re.S | re.M)
    if not match:
        raise SystemExit(f"{CHANGELOG.name} has no section for {version}")
    return match.group(1).strip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    group.add_argument("--notes", metavar="VERSION")
    args = parser.parse_args()
    if args.notes:
        sys.stdout.write(notes(args.notes))
        return 0
    current = CHANGELOG.read_text()
    wanted = replaced(current, unreleased())
    if args.check:
        if wanted != current:
            print(f"{CHANGELOG.name}'s Unreleased section differs from changes/: run `make changelog`", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        CHANGELOG.write_text(wanted)
        print(f"wrote {CHANGELOG.name}'s Unreleased section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
