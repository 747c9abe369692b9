"""One version (issue 29, item 3): pyproject.toml's ``[project] version`` is the only literal, and every
place that shows a version shows that one: the installed metadata (``gerdsen_ai_server.__version__``),
``impetus --version``, /health, /api/config, the OpenAPI document, the dashboard (it shows /health's),
and the Docker image's label (deploy/Dockerfile takes it as a build argument that the release workflow
reads from pyproject.toml, and the build stops when it differs from the installed package's)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

import gerdsen_ai_server
from gerdsen_ai_server.app import build_engine, create_app
from gerdsen_ai_server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gerdsen_ai_server"


def declared() -> str:
    """The one source: pyproject.toml's static [project] version."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project.get("dynamic", []), "the version is static in pyproject.toml, not dynamic"
    return str(project["version"])


def test_metadata_is_pyproject() -> None:
    # A stale editable install (pyproject bumped, not reinstalled) fails here rather than shipping the old number.
    assert importlib.metadata.version("impetus") == declared(), "installed metadata is stale: run `make setup`"
    assert gerdsen_ai_server.__version__ == declared()


def test_no_second_literal_in_the_package() -> None:
    version_literal = re.compile(r"""__version__\s*(:\s*str\s*)?=\s*["']\d+\.\d""")  # "0+unknown" is no version
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if version_literal.search(p.read_text())]
    assert offenders == [], f"a version literal besides pyproject.toml's: {offenders}"


def test_cli_version() -> None:
    script = Path(sys.executable).parent / "impetus"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gerdsen_ai_server.cli"]
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"impetus {declared()}"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    """The real app over a real engine with no model (about 2 s): /health reads the engine."""
    config = {"default_model": "", "log_level": "warning", "models_dir": str(tmp_path_factory.mktemp("models"))}
    engine = build_engine(Settings.from_mapping(config))
    engine.start()
    try:
        yield create_app(config, engine=engine).test_client()
    finally:
        engine.shutdown()


def test_http_versions(client: FlaskClient) -> None:
    health = client.get("/health")
    config = client.get("/api/config")
    spec = client.get("/openapi.json")
    assert (health.status_code, config.status_code, spec.status_code) == (200, 200, 200)
    assert health.json is not None and config.json is not None and spec.json is not None
    assert health.json["version"] == declared()
    assert config.json["version"] == declared()
    assert spec.json["info"]["version"] == declared()


def test_dashboard_shows_health_version() -> None:
    page = (ROOT / "impetus-dashboard" / "src" / "pages" / "Server.tsx").read_text()
    assert re.search(r'\["version",\s*h\.version\]', page), (
        "the dashboard's Server page no longer shows /health's version"
    )


def test_docker_label_comes_from_the_build_argument() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG IMPETUS_VERSION\b", dockerfile, re.M)
    assert 'org.opencontainers.image.version="${IMPETUS_VERSION}"' in dockerfile
    # ...checked against the installed package inside the image, so a wrong argument stops the build.
    assert '"$IMPETUS_VERSION" != "$installed"' in dockerfile
    release = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    # ...and the release workflow passes pyproject.toml's version, after checking the tag names it.
    assert "IMPETUS_VERSION=${{ needs.dist.outputs.version }}" in release
    assert '["project"]["version"]' in release and '"v${version}" != "${GITHUB_REF_NAME}"' in release
