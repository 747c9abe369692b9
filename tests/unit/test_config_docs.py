"""docs/configuration.md documents every setting (regenerate with scripts/gen_config_docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gerdsen_ai_server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    prefix = Settings.model_config.get("env_prefix", "")
    missing = [f"{prefix}{name.upper()}" for name in Settings.model_fields if f"`{prefix}{name.upper()}`" not in text]
    assert not missing, f"not in docs/configuration.md: {missing}; run: .venv/bin/python scripts/gen_config_docs.py"


def test_generator_runs_in_check_mode() -> None:
    # The generator itself must keep working; staleness of descriptions is reported, not fatal.
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
