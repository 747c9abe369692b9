"""/openapi.json and /docs on the real server, and schemathesis against that document: generated
requests for every documented operation, valid and invalid, bounded in number. None may get a 5xx,
and every answer must match the status codes, headers and schemas the document promises."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks

from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

# Loading or unloading models at random (names could be paths) is not what this test is about;
# their validation is the same parse_body + pydantic path the other operations exercise.
# Pulling reaches for the hub (no network here), and deleting at random could remove a cached test model.
SKIP_OPERATIONS = r"^/api/models/(load|unload|pull)$"
EXAMPLES = 10  # per operation and mode: about 300 requests in all
# A request the schema allows may still be refused with a 400 the document lists (an unsupported
# option, a prompt over the context, a tool the chat template cannot express): so no check that
# schema-valid data gets a 2xx. The rest stay: no 5xx; status codes, content types, headers and
# bodies as documented; schema-invalid data refused.
EXCLUDED_CHECKS = [checks.positive_data_acceptance]
KEY = "sk-impetus-fuzz-0123456789"  # an admin key: management is fuzzed too
NO_SHRINKING = [Phase.explicit, Phase.generate]  # report the first failure as found: shrinking over HTTP takes minutes


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """With a key, so the generated requests also prove that a wrong or missing key gets a 401;
    with a tiny default budget, so a request that reaches the model is over quickly."""
    # HF_HUB_OFFLINE: a generated discover query must not reach for the real hub (no network in tests).
    srv = start_server(
        tmp_path_factory.mktemp("openapi"), IMPETUS_ADMIN_KEYS=KEY, IMPETUS_MAX_TOKENS_DEFAULT="4", HF_HUB_OFFLINE="1"
    )
    yield srv
    stop_server(srv, wait=False)


def test_openapi_document_describes_the_api(keyed: Server) -> None:
    spec = requests.get(keyed.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"] == "3.1.0"
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/messages",
        "/v1/responses",
        "/health/ready",
    } <= set(spec["paths"])
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearerAuth": []}]
    assert {"200", "400", "401", "413", "429", "503"} <= set(chat["responses"])
    assert "x-ratelimit-remaining-requests" in chat["responses"]["200"]["headers"]
    assert "ChatCompletionRequest" in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "Rate limits" in spec["info"]["description"]
    # Every route has a real response model, so schemathesis checks what each one answers.
    assert {"/api/hardware", "/api/config", "/metrics", "/health", "/health/live"} <= set(spec["paths"])
    for path, method, model in (
        ("/v1/responses", "post", "ResponseObject"),
        ("/health", "get", "HealthReport"),
        ("/api/hardware", "get", "HardwareReport"),
        ("/health/ready", "get", "Readiness"),
    ):
        schema = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}, (path, schema)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "security" not in spec["paths"]["/metrics"]["get"]  # open unless IMPETUS_PROTECT_HEALTH


def test_protected_monitoring_is_documented_as_secured() -> None:
    from gerdsen_ai_server.api.ops.docs import build_spec

    spec = build_spec(protect_health=True)
    for path in ("/health", "/metrics"):
        operation = spec["paths"][path]["get"]
        assert operation["security"] == [{"bearerAuth": []}] and "401" in operation["responses"], path
    assert "security" not in spec["paths"]["/health/ready"]["get"]


def test_schema_names_do_not_depend_on_module_paths() -> None:
    """Two wire models named Usage: pydantic would name both by module path, so a module move would
    rename them in /openapi.json and in the dashboard's generated types. Their names are fixed."""
    from gerdsen_ai_server.api.ops.docs import build_spec

    names = set(build_spec()["components"]["schemas"])
    assert {"Usage", "AnthropicUsage"} <= names
    assert not [n for n in names if "gerdsen_ai_server" in n or "__" in n]


def test_docs_page_uses_only_local_assets(keyed: Server) -> None:
    page = requests.get(keyed.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/docs/") for s in sources), sources
    assert "<script>" not in page.text  # no inline script: the CSP allows 'self' only
    for source in sources + ["/docs/init.js"]:
        asset = requests.get(keyed.url + source, timeout=10)
        assert asset.status_code == 200 and len(asset.content) > 100, source
    assert "SwaggerUIBundle" in requests.get(keyed.url + "/docs/swagger-ui-bundle.js", timeout=10).text
    assert requests.get(keyed.url + "/docs/%2e%2e%2fpyproject.toml", timeout=10).status_code == 404
    assert requests.get(keyed.url + "/docs/index.template.html", timeout=10).status_code == 404


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests(keyed: Server, mode: str) -> None:
    # schemathesis's own pytest plugin does not load under pytest 9: drive hypothesis per operation.
    api = (
        schemathesis.openapi.from_url(keyed.url + "/openapi.json")
        .exclude(path_regex=SKIP_OPERATIONS)
        .exclude(method="DELETE", path="/api/models/{model_id}")
    )
    generation_mode = schemathesis.GenerationMode(mode)
    for result in api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=generation_mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=NO_SHRINKING,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:  # type: ignore[no-untyped-def]
            if isinstance(case.body, dict):  # bodies that do reach the model generate a few tokens at most
                for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    if type(case.body.get(field)) is int and case.body[field] > 4:
                        case.body[field] = 4
            case.call_and_validate(
                timeout=60, headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=EXCLUDED_CHECKS
            )

        try:
            check()
        except Unsatisfiable:  # negative mode, an operation with no input to spoil (GET /health)
            assert mode == "negative"
