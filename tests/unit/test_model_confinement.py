"""Issue 23, items 1 and 2 at the loader: what a request's ``model`` may name (``confine``), which
errors may leave the engine (``redact_paths``), and where a GGUF converts to (never over anything
it did not make). The same attacks through the real server: tests/api/test_safe_model_paths.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gerdsen_ai_server.engine.formats.gguf import CONVERTED_DIR, convert_gguf_to_mlx, converted_name, is_converted
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.engine.options import BackendOptions
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound
from gerdsen_ai_server.store.paths import confine, model_not_found, model_paths, redact_paths

factory = LoaderFactory(BackendOptions(backend="mlx"))  # a GGUF converts, rather than run on llama.cpp


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` (not following symlinks) with its size and mtime: what "nothing
    was deleted or replaced" compares."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """models/ with a model folder, an MLX-looking folder, escaping and inner symlinks; outside/ beside it."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    for folder in (models / "tiny", models / "org--tiny", outside / "secret"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x")
    (outside / "secret.gguf").write_bytes(b"GGUF")
    (models / "escape").symlink_to(outside / "secret")  # an entry that leads out
    (models / "inner").symlink_to(models / "tiny")  # an entry that stays inside
    leaky = models / "leaky"  # a real folder whose weights link out
    leaky.mkdir()
    (leaky / "config.json").write_text("{}")
    (leaky / "model.safetensors").symlink_to(outside / "secret" / "model.safetensors")
    (models / ".impetus").mkdir()
    return models, outside


REFUSED = [
    "/etc/passwd",
    "/etc/no-such-file",
    "~/x",
    "~",
    "~root/.ssh",
    "~no-such-user/x",
    "../outside/secret",
    "..",
    ".",
    "",
    "  ",
    "tiny/../escape",
    "org/tiny/extra",
    "a\\b",
    "..\\outside",
    "tiny\x00",
    ".impetus",
    "escape",
    "leaky",
    "no-such-model",
    "x" * 5000,
    "tiny\n",
    "/",
    "//etc/passwd",
]


@pytest.mark.parametrize("spec", REFUSED)
def test_untrusted_specs_outside_the_models_dir_get_one_uniform_refusal(tree: tuple[Path, Path], spec: str) -> None:
    models, outside = tree
    with pytest.raises(ModelNotFound) as info:
        factory.resolve(spec, models)
    message = str(info.value)
    assert message == str(model_not_found(spec))  # the same words whether or not anything is there
    assert str(models.parent) not in message and "<" not in message  # the spec as sent, nothing resolved
    assert str(Path.home()) not in message.replace(spec, "")  # "~" is never expanded


def test_models_in_the_models_dir_resolve(tree: tuple[Path, Path]) -> None:
    models, _ = tree
    assert confine("tiny", models) == models / "tiny"
    assert confine("TINY", models) == models / "tiny"  # as before: a name's lower-case folder
    assert confine("org/tiny", models) == models / "org--tiny"  # a pulled repo by its hub id
    assert confine("inner", models) == models / "inner"  # a symlink that stays inside is fine
    assert factory.resolve("tiny", models) == models / "tiny"


def test_model_paths_allow_a_listed_outside_path_and_nothing_beside_it(tree: tuple[Path, Path]) -> None:
    models, outside = tree
    allowed = model_paths(f" {outside / 'secret'} ,,{outside / 'secret.gguf'}")
    assert allowed == (outside / "secret", outside / "secret.gguf")
    assert confine(str(outside / "secret"), models, allowed) == outside / "secret"
    assert confine(str(outside / "secret.gguf"), models, allowed) == outside / "secret.gguf"
    assert confine("escape", models, allowed) == models / "escape"  # its target is listed now
    assert confine("leaky", models, allowed) == models / "leaky"
    for spec in (
        str(outside),
        str(outside / "secret" / ".." / "secret.gguf"),
        "/etc/passwd",
        str(models.parent / "models" / "tiny"),
    ):  # only the listed paths, never by their side
        with pytest.raises(ModelNotFound):
            confine(spec, models, allowed)
    (outside / "secret" / "link").symlink_to("/etc")  # inside a listed folder, leading out of it
    with pytest.raises(ModelNotFound):
        confine(str(outside / "secret" / "link" / "passwd"), models, allowed)


def test_trusted_specs_may_name_any_path(tree: tuple[Path, Path]) -> None:
    models, outside = tree
    assert factory.resolve(str(outside / "secret"), models, trusted=True) == outside / "secret"
    with pytest.raises(ModelNotFound):
        factory.resolve("~no-such-user/x", models, trusted=True)  # not a RuntimeError from expanduser


def test_error_text_that_leaves_the_engine_names_no_host_path(tree: tuple[Path, Path]) -> None:
    models, outside = tree
    text = f"cannot load model from {models}/broken: see {Path.home()}/.cache/x and {outside}/secret/model"
    redacted = redact_paths(text, models, model_paths(str(outside / "secret")))
    assert redacted == ("cannot load model from <models_dir>/broken: see ~/.cache/x and <model_paths>/secret/model")
    assert redact_paths("the models dir holds models", Path("models")) == "the models dir holds models"


# ---- item 2: conversion never deletes what it did not create -----------------------------------


@pytest.fixture
def gguf_models(tmp_path: Path, default_gguf: Path) -> Path:
    models = tmp_path / "models"
    (models / "keep").mkdir(parents=True)
    (models / "keep" / "notes.txt").write_text("mine")
    (models / "tiny").mkdir()
    (models / "tiny" / "config.json").write_text('{"model_type": "llama"}')
    (models / "tiny" / "model.safetensors").write_bytes(b"user weights")
    for name in ("..gguf", "tiny.gguf"):
        shutil.copyfile(default_gguf, models / name)
    return models


def test_a_gguf_named_dot_dot_gguf_converts_into_its_own_folder(gguf_models: Path) -> None:
    before = snapshot(gguf_models)
    out = factory.resolve(str(gguf_models / "..gguf"), gguf_models, trusted=True)  # as IMPETUS_DEFAULT_MODEL
    assert out.parent == gguf_models / CONVERTED_DIR and out.name.startswith("model-") and is_converted(out)
    after = snapshot(gguf_models)
    assert {k: v for k, v in after.items() if not k.startswith(".impetus")} == before  # nothing gone or changed
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, f".{out.name}.lock"])


def test_a_gguf_named_like_a_model_folder_leaves_that_folder_alone(gguf_models: Path) -> None:
    before = snapshot(gguf_models)
    out = factory.resolve("tiny.gguf", gguf_models)  # a request's name
    assert out == gguf_models / CONVERTED_DIR / converted_name(gguf_models / "tiny.gguf") and is_converted(out)
    assert out.name.startswith("tiny-")
    assert {k: v for k, v in snapshot(gguf_models).items() if not k.startswith(".impetus")} == before
    assert (gguf_models / "tiny" / "model.safetensors").read_bytes() == b"user weights"
    assert factory.resolve("tiny.gguf", gguf_models) == out  # cached


def test_hidden_ggufs_cannot_be_named_by_a_request(gguf_models: Path) -> None:
    with pytest.raises(ModelNotFound):
        factory.resolve("..gguf", gguf_models)


def test_conversion_never_replaces_a_folder_it_did_not_make(gguf_models: Path, default_gguf: Path) -> None:
    before = snapshot(gguf_models)
    for target in (gguf_models, gguf_models / ".", gguf_models / "keep", gguf_models / "tiny"):
        with pytest.raises(ModelLoadError):
            convert_gguf_to_mlx(default_gguf, target)
    with pytest.raises(ModelLoadError):
        convert_gguf_to_mlx(default_gguf, gguf_models / "..")
    assert snapshot(gguf_models) == before  # not even a lock file beside them
    assert (gguf_models / "keep" / "notes.txt").read_text() == "mine"


def test_an_incomplete_conversion_of_our_own_is_redone(tmp_path: Path, default_gguf: Path) -> None:
    out = convert_gguf_to_mlx(default_gguf, tmp_path / "ours")
    (out / "tokenizer.json").unlink()  # a user deleted a file from a folder we made
    assert convert_gguf_to_mlx(default_gguf, out) == out and is_converted(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_converted_folder_stays_inside_the_models_dir(gguf_models: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (gguf_models / ".impetus").symlink_to(elsewhere)  # the cache folder sent out of the models dir
    with pytest.raises(ModelLoadError, match="leaves the models dir"):
        factory.resolve("tiny.gguf", gguf_models)
    assert list(elsewhere.iterdir()) == []


def test_the_default_model_still_converts_to_its_own_folder(models_dir: Path, converted_default: Path) -> None:
    assert factory.resolve(DEFAULT_MODEL_ID, models_dir) == models_dir / DEFAULT_MODEL_ID == converted_default


@pytest.mark.parametrize("name", ["tiny\x00", "x" * 5000, "~/x", "../outside/secret", ".impetus", "a\\b"])
def test_local_model_lookup_refuses_the_same_names_without_crashing(tree: tuple[Path, Path], name: str) -> None:
    from gerdsen_ai_server.store.local import find

    models, _ = tree
    with pytest.raises(ModelNotFound):  # not a ValueError (NUL) or OSError (name too long): a 404, not a 500
        find(models, name)
    assert find(models, "escape") == models / "escape"  # deleting a symlink entry unlinks it, nothing beyond
