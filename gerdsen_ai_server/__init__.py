"""Impetus: an OpenAI-compatible LLM inference server over MLX.

``__version__`` has one source, pyproject.toml's ``[project] version``, read here from the installed
package's metadata, so ``impetus --version``, /health, /api/config, the OpenAPI document, the dashboard
(through /health) and the Docker image's label (built with ``--build-arg IMPETUS_VERSION``, checked
against this in the image) cannot disagree. ``make release VERSION=x.y.z`` is the one way to change it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("impetus")
except PackageNotFoundError:  # a source tree on sys.path that was never installed (`make setup` installs it)
    __version__ = "0+unknown"
