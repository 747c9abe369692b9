"""Presets without a server: the files (store/presets.py), their schema, the merge of a preset's defaults
under a request's own values (serving/presets.py), and `impetus preset` in a temporary models dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gerdsen_ai_server.schemas.openai import ChatCompletionRequest, CompletionRequest
from gerdsen_ai_server.schemas.presets import MAX_TEMPLATE_CHARS, Preset
from gerdsen_ai_server.serving.presets import load_options, merged, resident_id
from gerdsen_ai_server.store import presets as store
from gerdsen_ai_server.store.local import scan
from tests.support import ROOT

HI = [{"role": "user", "content": "hi"}]


def preset(**fields: object) -> Preset:
    return Preset.model_validate({"name": "coder", "model": "tiny", **fields})


def test_written_read_listed_and_deleted(tmp_path: Path) -> None:
    p = preset(parameters={"temperature": 0.2, "stop": ["\n\n"]}, system="Be brief.", context_length=1024)
    path = store.write(tmp_path, p)
    assert path == tmp_path / "presets" / "coder.json"
    assert json.loads(path.read_text())["parameters"]["temperature"] == 0.2
    assert store.read(tmp_path, "coder") == p
    assert store.list_all(tmp_path) == ([p], {})
    assert not [f for f in path.parent.iterdir() if f.name.startswith(".")]  # no temporary file left
    store.delete(tmp_path, "coder")
    with pytest.raises(store.PresetNotFound):
        store.read(tmp_path, "coder")
    with pytest.raises(store.PresetNotFound):
        store.delete(tmp_path, "coder")


def test_toml_is_read_and_a_write_replaces_it(tmp_path: Path) -> None:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "chat.toml").write_text(
        'model = "tiny"\nsystem = "Be kind."\ncontext_length = 2048\n'
        "[parameters]\ntemperature = 0\nmax_tokens = 64\n[chat_template_kwargs]\nenable_thinking = false\n"
    )
    p = store.read(tmp_path, "chat")
    assert (p.name, p.parameters.temperature, p.parameters.max_tokens, p.context_length) == ("chat", 0.0, 64, 2048)
    assert p.chat_template_kwargs == {"enable_thinking": False}
    store.write(tmp_path, p.model_copy(update={"system": "Be terse."}))
    assert sorted(f.name for f in folder.iterdir()) == ["chat.json"]
    assert store.read(tmp_path, "chat").system == "Be terse."


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "x" * 65, "", "-x", "a b", "a\\b", "ü"])
def test_names_that_could_make_a_path_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(store.PresetError):
        store.check_name(name)
    with pytest.raises(store.PresetError):
        store.read(tmp_path, name)
    with pytest.raises(ValueError):
        preset(name=name)
    assert store.find(tmp_path, name) is None
    assert not (tmp_path / "presets").exists()


def test_files_and_folders_that_lead_outside_are_refused(tmp_path: Path) -> None:
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps({"model": "tiny"}))
    (models / "presets").mkdir()
    (models / "presets" / "leak.json").symlink_to(outside / "secret.json")
    with pytest.raises(store.PresetError, match="outside"):
        store.read(models, "leak")
    (models / "presets" / "leak.json").unlink()
    (models / "presets").rmdir()
    (models / "presets").symlink_to(outside)
    with pytest.raises(store.PresetError, match="outside"):
        store.write(models, preset())
    assert sorted(f.name for f in outside.iterdir()) == ["secret.json"]


def test_a_broken_file_is_reported_not_served(tmp_path: Path) -> None:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "typo.json").write_text(json.dumps({"model": "tiny", "temprature": 0.1}))
    (folder / "other.json").write_text(json.dumps({"name": "else", "model": "tiny"}))
    (folder / "bad.toml").write_text("model = ")
    found, broken = store.list_all(tmp_path)
    assert found == [] and set(broken) == {"typo", "other", "bad"}
    assert "temprature" in broken["typo"] and "else" in broken["other"] and "TOML" in broken["bad"]
    assert store.find(tmp_path, "typo") is None


@pytest.mark.parametrize("spec", ["/etc/passwd", "../x", "~/x", "a/b/c", ".hidden", "a\\b"])
def test_model_and_adapter_are_confined_like_a_request(spec: str) -> None:
    with pytest.raises(store.PresetError, match="model"):
        store.check(preset(model=spec))
    with pytest.raises(store.PresetError, match="adapter"):
        store.check(preset(adapter=spec))


def test_an_absolute_path_only_under_model_paths(tmp_path: Path) -> None:
    store.check(preset(model="org/name"))
    store.check(preset(model=str(tmp_path / "m")), allowed=[tmp_path])
    with pytest.raises(store.PresetError):
        store.check(preset(model=str(tmp_path / "m")))
    with pytest.raises(store.PresetError):
        store.check(preset(model=f"{tmp_path}/../x"), allowed=[tmp_path])


def test_the_schema_bounds_what_a_preset_holds() -> None:
    with pytest.raises(ValueError, match="parameters.logprobs"):
        preset(parameters={"logprobs": True})
    with pytest.raises(ValueError, match="temperature"):
        preset(parameters={"temperature": 3})
    with pytest.raises(ValueError, match="chat_template"):
        preset(chat_template="x" * (MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(ValueError, match="messages"):
        preset(chat_template_kwargs={"messages": []})
    with pytest.raises(ValueError, match="stop"):
        preset(parameters={"stop": ["a", "b", "c", "d", "e"]})


def test_load_options_make_an_alias_and_defaults_alone_do_not() -> None:
    defaults = preset(parameters={"temperature": 0.1}, system="x", keep_alive=-1)
    assert not defaults.has_load_options() and load_options(defaults).alias is None
    assert resident_id(defaults) == "tiny"
    for options in ({"context_length": 1024}, {"backend": "mlx"}, {"chat_template": "{{ x }}"}, {"adapter": "a"}):
        p = preset(**options)
        assert p.has_load_options() and resident_id(p) == "coder"
        assert load_options(p).alias == "coder" and not load_options(p).is_default
    assert load_options(preset(context_length=1024)).context_length == 1024


def test_the_request_s_explicit_values_beat_the_preset_s() -> None:
    p = preset(
        parameters={"temperature": 0.0, "max_tokens": 5, "stop": ["END"], "top_k": 3},
        system="Be brief.",
        chat_template_kwargs={"enable_thinking": False, "style": "a"},
    )
    implicit = merged(ChatCompletionRequest.model_validate({"model": "coder", "messages": HI}), p)
    assert (implicit.temperature, implicit.max_tokens, implicit.stop, implicit.top_k) == (0.0, 5, ["END"], 3)
    assert [m.role for m in implicit.messages] == ["system", "user"] and implicit.messages[0].content == "Be brief."
    assert implicit.chat_template_kwargs == {"enable_thinking": False, "style": "a"}
    explicit = merged(
        ChatCompletionRequest.model_validate(
            {
                "model": "coder",
                "messages": [{"role": "developer", "content": "mine"}, *HI],
                "temperature": 1.0,  # the default's own value, sent explicitly: still the request's
                "max_tokens": 9,
                "stop": None,
                "chat_template_kwargs": {"style": "b"},
            }
        ),
        p,
    )
    assert (explicit.temperature, explicit.max_tokens, explicit.stop, explicit.top_k) == (1.0, 9, None, 3)
    assert [m.content for m in explicit.messages] == ["mine", "hi"]
    assert explicit.chat_template_kwargs == {"enable_thinking": False, "style": "b"}
    completion = merged(CompletionRequest.model_validate({"model": "coder", "prompt": "x", "max_tokens": 2}), p)
    assert (completion.temperature, completion.max_tokens, completion.stop) == (0.0, 2, ["END"])


def test_the_models_scan_does_not_list_the_presets_folder(tmp_path: Path) -> None:
    store.write(tmp_path, preset())
    assert [m.id for m in scan(tmp_path)] == []


def impetus(models: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMPETUS_MODELS_DIR": str(models)}
    return subprocess.run(
        [sys.executable, "-m", "gerdsen_ai_server.cli", "preset", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_create_list_show_rm(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)  # a model's folder: a preset may not take its name
    spec = tmp_path / "base.toml"
    spec.write_text('name = "base"\nmodel = "tiny"\nsystem = "From the file."\n[parameters]\ntemperature = 0.5\n')
    made = impetus(models, "create", "coder", "--file", str(spec), "--temperature", "0", "--max-tokens", "8")
    assert made.returncode == 0, made.stderr
    shown = json.loads(impetus(models, "show", "coder").stdout)
    assert shown["parameters"]["temperature"] == 0.0 and shown["parameters"]["max_tokens"] == 8
    assert shown["system"] == "From the file." and shown["model"] == "tiny"
    assert impetus(models, "create", "coder", "--model", "tiny").returncode == 1  # exists: --force replaces
    assert impetus(models, "create", "coder", "--model", "tiny", "--context-length", "64", "--force").returncode == 0
    assert impetus(models, "create", "tiny", "--model", "tiny").returncode == 1  # a model's id
    refused = impetus(models, "create", "../x", "--model", "tiny")
    assert refused.returncode == 1 and "not a preset name" in refused.stderr
    assert impetus(models, "create", "y", "--model", "/etc/passwd").returncode == 1
    listed = impetus(models, "list").stdout
    assert "coder" in listed and "own load options" in listed
    assert impetus(models, "rm", "coder").returncode == 0
    assert impetus(models, "rm", "coder").returncode == 1
    assert sorted(p.name for p in (models / "presets").iterdir()) == []
