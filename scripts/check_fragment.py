"""A change to the package comes with a news fragment: `python scripts/check_fragment.py BASE`.

Exit 1 when ``git diff BASE...HEAD`` (what this branch changed since it left BASE) touches a file under
gerdsen_ai_server/ and adds no file under changes/ (changes/README.md tells how to write one). The
pull-request workflow runs it with the target branch as BASE; .ci/run does not, because a plain clone
has no base to compare with. Tests, docs and tooling alone need no fragment: they change nothing a user
of a release sees.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PACKAGE = "gerdsen_ai_server/"
FRAGMENTS = "changes/"


def changed(base: str, *, added_only: bool = False) -> list[str]:
    command = ["git", "diff", "--name-only", "--no-renames", f"{base}...HEAD"]
    if added_only:
        command.insert(2, "--diff-filter=A")
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()


def verdict(paths: list[str], added: list[str]) -> str | None:
    """Why the change needs a fragment it lacks, or None when it is fine."""
    package = [p for p in paths if p.startswith(PACKAGE)]
    fragments = [p for p in added if p.startswith(FRAGMENTS) and p != f"{FRAGMENTS}README.md"]
    if package and not fragments:
        shown = ", ".join(package[:5]) + (f" and {len(package) - 5} more" if len(package) > 5 else "")
        return (
            f"{shown} changed but no news fragment was added under {FRAGMENTS}: "
            f"add {FRAGMENTS}<issue>.<type>.md (see {FRAGMENTS}README.md), then `make changelog`"
        )
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit or branch this change is compared with, e.g. origin/main")
    base = parser.parse_args().base
    why = verdict(changed(base), changed(base, added_only=True))
    if why:
        print(f"check_fragment: {why}", file=sys.stderr)
        return 1
    print(f"check_fragment: ok against {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
