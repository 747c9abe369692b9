"""GET /api/config shows every setting and no secret."""

from __future__ import annotations

from gerdsen_ai_server.api.admin import config as server_config
from gerdsen_ai_server.config import Settings
from tests.support.apps import bare_app


def client(**overrides: object):  # type: ignore[no-untyped-def]
    app, _ = bare_app(**overrides)
    app.register_blueprint(server_config.bp)
    return app.test_client()


def test_every_setting_with_its_variable() -> None:
    body = client(max_batch=3).get("/api/config").json
    entries = {e["name"]: e for e in body["data"]}
    assert set(entries) == set(Settings.model_fields)
    assert entries["max_batch"] == {
        "name": "max_batch",
        "env": "IMPETUS_MAX_BATCH",
        "value": 3,
        "secret": False,
        "description": Settings.model_fields["max_batch"].description,
    }
    assert isinstance(entries["models_dir"]["value"], str)


def test_secrets_are_masked() -> None:
    fields = Settings.model_fields
    overrides = {}
    if "api_keys" in fields:
        overrides["api_keys"] = "sk-one,sk-two"
    if "redis_url" in fields:
        overrides["redis_url"] = "redis://user:hunter2@cache:6379/0"
    response = client(**overrides).get("/api/config")
    text = response.get_data(as_text=True)
    assert "sk-one" not in text and "sk-two" not in text and "hunter2" not in text
    entries = {e["name"]: e for e in response.json["data"]}
    if "api_keys" in fields:
        assert entries["api_keys"]["secret"] and entries["api_keys"]["value"] == "******** (2 keys)"
    if "redis_url" in fields:
        assert entries["redis_url"]["value"] == "redis://user:********@cache:6379/0"


def test_masking_rules() -> None:
    assert server_config.is_secret("api_keys") and server_config.is_secret("hf_token")
    assert not server_config.is_secret("api_key_file") and not server_config.is_secret("keep_alive")
    assert server_config.without_password("http://host:80/x") == "http://host:80/x"
    assert server_config.shown("api_keys", "") is None


def test_the_prompt_cache_bound_is_auto_by_default() -> None:
    """-1 (auto): an eighth of the RAM between 256 MiB and 8 GiB (llama-server's --cache-ram); a set value stays."""
    import psutil

    ram = psutil.virtual_memory().total
    assert Settings().prompt_cache_bytes == -1
    assert Settings().prompt_cache_bytes_value() == max(256 << 20, min(8 << 30, ram // 8))
    assert Settings(prompt_cache_bytes=0).prompt_cache_bytes_value() == 0
    assert Settings(prompt_cache_bytes=5 << 20).prompt_cache_bytes_value() == 5 << 20
