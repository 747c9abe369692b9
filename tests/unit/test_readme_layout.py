"""README.md's layout section is the tree's (scripts/gen_layout.py), and every module says what it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_layout  # noqa: E402


def test_readme_layout_matches_the_tree() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_layout.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_every_module_and_package_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in sorted(gen_layout.PACKAGE.rglob("*.py"))
        if "__pycache__" not in p.parts and p.name != "__main__.py" and not gen_layout.summary(p)
    ]
    assert not missing, f"give these a docstring (its first line is their README line): {missing}"


def test_the_other_entries_exist() -> None:
    gone = [name for name, _ in gen_layout.OTHERS if not (ROOT / name.rstrip("/")).exists()]
    assert not gone, f"README's layout names what is not there: {gone}"
