"""The changelog and the release (issue 29, item 4), on real git repositories in temporary folders: the
fragment check of pull requests, CHANGELOG.md kept in step with changes/, and `make release`'s script
(refusals, then a real release: version bumped, section written, fragments gone, commit and tag)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, capture_output=True, text=True, check=True).stdout


def script(repo: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "scripts" / name), *args],
        cwd=repo,
        env=GIT_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def repo_with(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "base")
    return repo


def commit(repo: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "change")


def test_package_change_needs_a_fragment(tmp_path: Path) -> None:
    checker = (ROOT / "scripts" / "check_fragment.py").read_text()
    repo = repo_with(tmp_path, {"scripts/check_fragment.py": checker, "gerdsen_ai_server/a.py": "x = 1\n"})
    commit(repo, {"tests/test_a.py": "def test(): pass\n"})  # tests alone: no fragment needed
    assert script(repo, "check_fragment.py", "HEAD~1").returncode == 0
    commit(repo, {"gerdsen_ai_server/a.py": "x = 2\n"})
    refused = script(repo, "check_fragment.py", "HEAD~2")
    assert refused.returncode == 1 and "gerdsen_ai_server/a.py" in refused.stderr
    commit(repo, {"changes/README.md": "edited\n"})  # the folder's README is not a fragment
    assert script(repo, "check_fragment.py", "HEAD~3").returncode == 1
    commit(repo, {"changes/7.fixed.md": "x is 2.\n"})
    assert script(repo, "check_fragment.py", "HEAD~4").returncode == 0


def test_unreleased_section_matches_the_fragments() -> None:
    result = script(ROOT, "changelog.py", "--check")
    assert result.returncode == 0, result.stderr


def release_repo(tmp_path: Path) -> Path:
    files = {
        name: (ROOT / name).read_text()
        for name in (
            "pyproject.toml",
            "CHANGELOG.md",
            "scripts/release.py",
            "scripts/changelog.py",
            "changes/README.md",
        )
    }
    files["changes/7.fixed.md"] = "Seven is fixed.\n"
    repo = repo_with(tmp_path, files)
    assert script(repo, "changelog.py", "--write").returncode == 0
    git(repo, "commit", "--quiet", "-am", "unreleased section")
    return repo


def test_release_refusals_and_dry_run(tmp_path: Path) -> None:
    repo = release_repo(tmp_path)
    current = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    assert "not above" in script(repo, "release.py", current).stderr
    assert "x.y.z" in script(repo, "release.py", "v99.0").stderr
    dry = script(repo, "release.py", "99.0.0", "--dry-run")
    assert dry.returncode == 0 and "## [99.0.0]" in dry.stdout and "Seven is fixed. (#7)" in dry.stdout
    assert git(repo, "status", "--porcelain") == "" and git(repo, "tag") == ""  # the dry run changed nothing
    (repo / "stray.txt").write_text("uncommitted\n")
    dirty = script(repo, "release.py", "99.0.0")
    assert dirty.returncode == 1 and "uncommitted" in dirty.stderr and git(repo, "tag") == ""


def test_release(tmp_path: Path) -> None:
    repo = release_repo(tmp_path)
    if shutil.which("towncrier") is None and not (Path(sys.executable).parent / "towncrier").exists():
        raise AssertionError("towncrier is not installed: it is pinned in requirements-dev.txt (`make setup`)")
    result = script(repo, "release.py", "99.0.0")
    assert result.returncode == 0, result.stderr
    assert tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"] == "99.0.0"
    assert not (repo / "changes" / "7.fixed.md").exists() and (repo / "changes" / "README.md").exists()
    assert git(repo, "tag").split() == ["v99.0.0"] and git(repo, "status", "--porcelain") == ""
    assert git(repo, "log", "-1", "--format=%s") == "Release 99.0.0\n"
    notes = script(repo, "changelog.py", "--notes", "99.0.0")
    assert notes.returncode == 0 and notes.stdout.startswith("### Fixed") and "Seven is fixed. (#7)" in notes.stdout
    assert script(repo, "changelog.py", "--check").returncode == 0  # Unreleased is empty again
    assert "Nothing yet" in (repo / "CHANGELOG.md").read_text().split("<!-- unreleased end -->")[0]
