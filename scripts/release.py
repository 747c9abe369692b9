"""`make release VERSION=x.y.z [DRY_RUN=1]`: bump pyproject.toml's version (the one source), move the news
fragments into CHANGELOG.md's new section (towncrier), commit, and tag ``vx.y.z``. Pushing the tag
(`git push origin vx.y.z`) is left to the person: the tag starts .github/workflows/release.yml.

Refuses a dirty working tree (the release commit must hold the release and nothing else), a version
that is not x.y.z or not above the current one, and a tag that exists. ``--dry-run`` checks all that,
prints the section the release would write, and changes nothing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def tool(name: str) -> str:
    """A tool of the venv this runs in (towncrier), so a release never picks an unpinned one from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def current_version() -> str:
    return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])


def bumped(text: str, version: str) -> str:
    """pyproject.toml with [project]'s version line replaced, and nothing else touched."""
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", text, re.S | re.M)
    if not project:
        raise SystemExit("pyproject.toml has no [project] table")
    block, count = re.subn(r'^version = "[^"]*"$', f'version = "{version}"', project.group(1), count=1, flags=re.M)
    if count != 1:
        raise SystemExit('pyproject.toml\'s [project] has no static `version = "..."` line')
    return text[: project.start(1)] + block + text[project.end(1) :]


def refusal(version: str) -> str | None:
    """Why this release cannot be made now, or None."""
    new, old = SEMVER.match(version), SEMVER.match(current_version())
    if not new:
        return f"VERSION must be x.y.z (digits), not {version!r}"
    if old and tuple(map(int, new.groups())) <= tuple(map(int, old.groups())):
        return f"{version} is not above the current version {current_version()}"
    if git("status", "--porcelain"):
        return "the working tree has uncommitted changes: commit or remove them first"
    if git("tag", "--list", f"v{version}"):
        return f"the tag v{version} exists"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version")
    parser.add_argument("--dry-run", action="store_true", help="check and show; change nothing")
    args = parser.parse_args()
    version: str = args.version
    if why := refusal(version):
        print(f"release refused: {why}", file=sys.stderr)
        return 1
    if args.dry_run:
        draft = subprocess.run(
            [tool("towncrier"), "build", "--draft", "--version", version],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(
            f"dry run: would set version {current_version()} -> {version}, write this section, "
            f"commit 'Release {version}' and tag v{version}:\n\n{draft.strip()}"
        )
        return 0
    PYPROJECT.write_text(bumped(PYPROJECT.read_text(), version))
    subprocess.run([tool("towncrier"), "build", "--version", version, "--yes"], cwd=ROOT, check=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "changelog.py"), "--write"], cwd=ROOT, check=True)
    git("add", "pyproject.toml", "CHANGELOG.md", "changes")
    git("commit", "--quiet", "-m", f"Release {version}")
    git("tag", "--annotate", f"v{version}", "-m", f"Impetus {version}")
    print(f"released {version}: commit and tag v{version} made. Push both: git push origin HEAD v{version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
