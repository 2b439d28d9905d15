"""`Classifier`: a trained fusion head and its frozen encoders, classifying strings in Python (no Trainer)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from layerfusion.checkpoint import read_checkpoint  # noqa: F401 (public here too)
from layerfusion.encoders.frozen import ComputeDtype, EncoderSpec, FrozenEncoder
from layerfusion.encoders.offline import no_loading_bars
from layerfusion.errors import CheckpointError, ConfigError, LayerFusionError
from layerfusion.features.extraction import TOKEN_BUDGET, extract_chunk
from layerfusion.files import fsync_dir, remove_temp_leftovers, temp_path
from layerfusion.fusion.heads import HEADS, build_head

FORMAT, VERSION = "layerfusion-classifier", 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "classifier.json", "head.safetensors", "README.md"
BLOCK_ROWS = 1024
"""Texts per block: each block is tokenised, length-sorted and batched on its own, so memory stays bounded
(MPNet's 13 layers: 1024 x 13 x 768 x 4 B = 41 MB of features) whatever the number of texts."""
PROGRESS_ROWS = 1000
"""A progress bar is drawn (on stderr) for calls with at least this many texts, unless `progress_bar` says."""
_LEGACY = object()  # `top_k` not given: the pipeline's one-best-dict-per-text form


class InputError(LayerFusionError, ValueError):
    """A text the classifier refuses (empty or whitespace-only, not a string): the message names the row."""


class Classifier:
    """A trained layerfusion model as one object, used as scikit-learn, transformers or sentence-transformers.

    `predict(texts)` gives an array of labels and `predict_proba(texts)` the probabilities (columns
    in `classes_` order); `clf(texts, top_k=...)` gives `{"label", "score"}` dicts like a
    text-classification pipeline; `encode(texts)` the fused representation; `predict_dicts(texts)`
    one `{"label", "probs"}` per text. A single string counts as one text; an empty or
    whitespace-only text is refused (`InputError` naming it), as training refuses it.

    The encoders run online, each only up to the deepest layer the head reads (early exit); nothing
    is cached and no Trainer is involved. Build one with `from_checkpoint` (a `fit` checkpoint) or
    `load` (a folder written by `save`).

    Thread safety: one `Classifier` may be shared by several threads calling `predict` /
    `predict_proba` at once; each call gives exactly what it gives alone. The encoders' layer taps keep
    their state per call and early exit stops the forward pass without changing the model (see
    docs/security.md; tests/test_threads.py). Do not change `layers`, `device` or the encoders while
    calls are running.

    Args:
        config: what `save` writes to classifier.json: encoders, label names, head kind and
            hyperparameters, the layers the head reads, and the hash of each encoder's weights.
        head_state: the head's weights (its state dict, names without the `head.` prefix).
        device: where to run (default: CUDA when available, else the CPU).
        compute_dtype: precision of every encoder's forward pass, overriding what each encoder was
            trained with (`auto`, `float32`, `tfloat32`, `bfloat16`, `float16`; see `EncoderSpec`).
        batch_size: at most this many texts per forward pass (None: no bound but the token budget).
        token_budget: at most this many padded tokens (rows x longest row) per forward pass, texts
            sorted by token length, as in feature extraction (None: no bound but `batch_size`).
        progress_bar: draw a progress bar on stderr (None: for calls of `PROGRESS_ROWS` texts or more).
        trust_remote_code: let the encoders' model directories run their own Python code. Only this
            argument can turn it on: a `trust_remote_code` stored in classifier.json or in a
            checkpoint's hyperparameters is ignored, so loading an artifact never runs code from it.
    """

    def __init__(
        self,
        config: dict[str, Any],
        head_state: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        compute_dtype: ComputeDtype | None = None,
        batch_size: int | None = None,
        token_budget: int | None = TOKEN_BUDGET,
        progress_bar: bool | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        _check_config(config)
        for name, value in (("batch_size", batch_size), ("token_budget", token_budget)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or None), got {value}")
        self.config = config
        self.label_names: list[str] = list(config["label_names"])
        self.layers: dict[str, list[int]] = {k: list(v) for k, v in config["layers"].items()}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.token_budget, self.progress_bar = (
            batch_size,
            token_budget,
            progress_bar,
        )
        self.encoders: dict[str, FrozenEncoder] = {}
        for raw in config["encoders"]:
            # the artifact's own trust_remote_code never counts: only the caller's argument
            spec = EncoderSpec(
                **{
                    **raw,
                    **({"compute_dtype": compute_dtype} if compute_dtype else {}),
                    "trust_remote_code": trust_remote_code,
                }
            )
            with no_loading_bars():
                encoder = FrozenEncoder(spec)
            _check_weights(encoder, config["encoder_ids"].get(spec.key))
            self.encoders[spec.key] = encoder.to(self.device)
        self.head = build_head(
            config["head"],
            dims={k: e.hidden_size for k, e in self.encoders.items()},
            num_layers={k: e.num_layers for k, e in self.encoders.items()},
            layers=self.layers,
            num_classes=len(self.label_names),
            **config["head_args"],
        )
        try:
            self.head.load_state_dict(head_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"the head weights do not fit a {config['head']!r} head over layers {self.layers}: {err}"
            ) from None
        self.head.to(self.device).eval()

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> Classifier:
        """The classifier saved in a `fit` checkpoint (`.ckpt`); keyword arguments as in `Classifier`."""
        ckpt = read_checkpoint(path)
        hparams, meta = ckpt.get("hyper_parameters") or {}, ckpt["layerfusion"]
        if "encoders" not in hparams:
            raise CheckpointError(
                f"checkpoint {path}: no encoder settings (hyper_parameters.encoders) to rebuild it from"
            )
        # the head's own hyperparameters: build_head's keyword arguments beyond its structure
        structure = {"kind", "dims", "num_layers", "layers", "num_classes"}
        head_args = {
            k: hparams[k]
            for k in inspect.signature(build_head).parameters
            if k not in structure and k in hparams
        }
        config = {
            "format": FORMAT,
            "version": VERSION,
            "label_names": list(meta["label_names"]),
            "head": meta["head"],
            "head_args": head_args,
            "layers": {k: list(v) for k, v in meta["selection"].items()},
            "encoders": [dict(e) for e in hparams["encoders"]],
            "encoder_ids": dict(meta["encoders"]),
            "trained": _training_summary(ckpt, path),
        }
        state = {k.removeprefix("head."): v for k, v in ckpt["state_dict"].items()}
        return cls(config, state, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> Classifier:
        """The classifier in a folder written by `save` (JSON and safetensors only, no pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(directory)
        config_path = folder / CONFIG_FILE
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a directory written by Classifier.save")
        if not config_path.is_file():
            hint = (
                " (save writes it last: a save into this folder did not finish; save it again)"
                if (folder / WEIGHTS_FILE).is_file()
                else ""
            )
            raise CheckpointError(
                f"{folder} has no {CONFIG_FILE}: it is not a folder written by Classifier.save{hint}"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise CheckpointError(
                f"{config_path}: not a layerfusion classifier (format != {FORMAT!r})"
            )
        if config.get("version") != VERSION:
            raise CheckpointError(
                f"{config_path}: format version {config.get('version')!r}; this layerfusion reads {VERSION}"
            )
        try:
            state = load_file(folder / WEIGHTS_FILE)
        except (FileNotFoundError, SafetensorError) as err:
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE}: cannot read the head weights ({err})"
            ) from None
        expected = config.get("head_sha256")  # absent in folders saved before it was recorded
        if expected is not None and _sha256(folder / WEIGHTS_FILE) != expected:
            raise CheckpointError(
                f"{folder / WEIGHTS_FILE} is not the head {CONFIG_FILE} was saved with (SHA-256 "
                f"{_sha256(folder / WEIGHTS_FILE)[:12]}..., recorded {expected[:12]}...): the file was "
                "replaced after the save; save the classifier again"
            )
        return cls(config, state, **kwargs)

    def save(self, directory: str | os.PathLike, overwrite_readme: bool = False) -> Path:
        """Write the head (safetensors), its settings (classifier.json) and a model card (README.md) to a folder.

        The folder is written as a set: every file is first written under a temporary name, then
        classifier.json is removed, the others are renamed into place, and classifier.json (which
        records the head's SHA-256) comes last. `load` requires it, so a save interrupted at any point
        never leaves a loadable folder that pairs a new head with an old config. An existing
        README.md is replaced only when a previous `save` wrote it unchanged, or `overwrite_readme`.
        """
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        card_path, config_path = folder / CARD_FILE, folder / CONFIG_FILE
        write_card = overwrite_readme or not card_path.exists() or _our_card(folder)
        if not write_card:
            warnings.warn(
                f"{card_path} is kept: it was not written by Classifier.save (or was edited since); "
                "pass overwrite_readme=True to replace it with the model card",
                stacklevel=2,
            )
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        for name in (WEIGHTS_FILE, CARD_FILE, CONFIG_FILE):  # of saves killed earlier (dead pids)
            remove_temp_leftovers(folder / name)
        staged: dict[Path, Path] = {}
        try:
            head_tmp = staged[folder / WEIGHTS_FILE] = temp_path(folder / WEIGHTS_FILE)
            save_file(state, str(head_tmp), {"format": "pt"})
            config = {
                k: v for k, v in self.config.items() if k not in ("head_sha256", "card_sha256")
            }
            config["head_sha256"] = _sha256(head_tmp)
            if write_card:
                card = self.model_card()
                card_tmp = staged[card_path] = temp_path(card_path)
                card_tmp.write_text(card, encoding="utf-8")
                config["card_sha256"] = _sha256(card_tmp)
            config_tmp = staged[config_path] = temp_path(config_path)
            text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            config_tmp.write_text(text, encoding="utf-8")
            for tmp in staged.values():  # the new content is on disk before any name changes
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            config_path.unlink(missing_ok=True)  # from here until the last rename: not loadable
            fsync_dir(folder)
            for final, tmp in staged.items():  # classifier.json last (dicts keep insertion order)
                os.replace(tmp, final)
            fsync_dir(folder)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
        return folder

    # -- inference -------------------------------------------------------------------------------

    @property
    def classes_(self) -> np.ndarray:
        """The label names, in the order of `predict_proba`'s columns (scikit-learn's `classes_`)."""
        return np.array(self.label_names)

    def predict(self, texts: str | Sequence[str]) -> np.ndarray:
        """The predicted label of each text, an array like `classes_` (scikit-learn's `predict`)."""
        return self.classes_[self.predict_proba(texts).argmax(axis=1)]

    def predict_proba(self, texts: str | Sequence[str]) -> np.ndarray:
        """Class probabilities, float32 `[N, C]`, columns in `classes_` order (scikit-learn's `predict_proba`)."""
        texts = _check_texts(texts)
        if not texts:
            return np.empty((0, len(self.label_names)), np.float32)
        return self._run(texts, self._probs, lambda i: f"texts[{i}]")

    def __call__(self, texts: str | Sequence[str], top_k: int | None | object = _LEGACY) -> list:
        """`{"label", "score"}` dicts, as a transformers text-classification pipeline returns them.

        Without `top_k`: one dict (the best label) per text. With `top_k=k` (None: every label): a
        list of the k best, highest score first, per text; for a single string, that list alone.
        """
        single = isinstance(texts, str)
        probs = self.predict_proba(texts)
        if top_k is _LEGACY:
            return [
                {"label": self.label_names[int(p.argmax())], "score": float(p.max())} for p in probs
            ]
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        ranked = [
            [
                {"label": self.label_names[int(j)], "score": float(p[j])}
                for j in np.argsort(-p, kind="stable")
            ][:top_k]
            for p in probs
        ]
        return ranked[0] if single else ranked

    def predict_dicts(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """One `{"label": name, "probs": {name: probability}}` per text, in the order given (what `classify` prints)."""
        return self._dicts(self.predict_proba(texts))

    def encode(
        self,
        texts: str | Sequence[str],
        output_value: Literal["fused", "layers"] = "fused",
        normalize_embeddings: bool = False,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Embeddings of the texts, as sentence-transformers' `encode`: float32 `[N, width]` (`[width]` for one string).

        `output_value="fused"`: the head's fused representation (the input of its final linear layer).
        `"layers"`: `{encoder: [N, k, d]}`, the pooled layers the head reads (`layers[encoder]`, in order).
        `normalize_embeddings`: unit length along the last axis (dot product = cosine similarity).
        """
        if output_value not in ("fused", "layers"):
            raise ValueError(f"output_value must be 'fused' or 'layers', got {output_value!r}")
        single = isinstance(texts, str)
        rows = _check_texts(texts)
        if output_value == "fused":
            out = self._run(rows, lambda f: self.head.represent(f).float(), lambda i: f"texts[{i}]")
            out = _normalize(out) if normalize_embeddings else out
            return out[0] if single else out
        # one pass over the encoders: every encoder's selected layers side by side, split afterwards
        flat = self._run(
            rows,
            lambda f: torch.cat([f[k][:, self.layers[k]].flatten(1) for k in self.encoders], 1),
            lambda i: f"texts[{i}]",
        )
        layers, start = {}, 0
        for key, encoder in self.encoders.items():
            shape = (len(self.layers[key]), encoder.hidden_size)
            part = flat[:, start : start + shape[0] * shape[1]].reshape(len(rows), *shape)
            start += shape[0] * shape[1]
            layers[key] = _normalize(part) if normalize_embeddings else part
        return {k: v[0] for k, v in layers.items()} if single else layers

    def _dicts(self, probs: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "label": self.label_names[int(p.argmax())],
                "probs": dict(zip(self.label_names, p.tolist())),
            }
            for p in probs
        ]

    def _probs(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self.head(features).float(), dim=-1)

    @torch.inference_mode()
    def _run(
        self,
        texts: list[str],
        output: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        where: Callable[[int], str],
    ) -> np.ndarray:
        """`output(features)` of every text, in blocks of `BLOCK_ROWS` (bounded memory), as one float32 array.

        Each block runs through each encoder in length-sorted batches of at most `token_budget`
        padded tokens (and `batch_size` rows) and stops at the deepest layer the head reads; a
        non-finite feature or output raises naming `where(row)`.
        """
        show = self.progress_bar if self.progress_bar is not None else len(texts) >= PROGRESS_ROWS
        parts: list[np.ndarray] = []
        with tqdm(total=len(texts), desc="classify", unit=" texts", disable=not show) as bar:
            for start in range(0, len(texts), BLOCK_ROWS):
                block = texts[start : start + BLOCK_ROWS]
                features = self._features(block, lambda r, s=start: where(s + r), bar.update)
                out = output(features).float().cpu()
                bad = ~torch.isfinite(out.flatten(1)).all(dim=1)
                if bad.any():
                    r = int(bad.nonzero()[0])
                    raise LayerFusionError(
                        f"{where(start + r)}: the head gave a non-finite output (text {block[r][:60]!r}); "
                        "check the classifier's weights and compute_dtype"
                    )
                parts.append(out.numpy())
        if not parts:
            raise InputError("no texts to classify (an empty list)")
        return np.concatenate(parts)

    def _features(
        self, texts: list[str], where: Callable[[int], str], advance: Callable[[int], Any]
    ) -> dict[str, torch.Tensor]:
        """Pooled layers `0..deepest selected` of every encoder, `{key: [B, k, d]}` on the device."""
        out = {}
        last = list(self.encoders)[-1]
        for key, encoder in self.encoders.items():
            feats = extract_chunk(
                encoder,
                texts,
                list(range(max(self.layers[key]) + 1)),
                self.device,
                self.token_budget,
                self.batch_size,
                where=where,
                advance=advance if key == last else lambda n: None,
            )
            out[key] = torch.from_numpy(feats).to(self.device)
        return out

    def model_card(self) -> str:
        """A short README.md: what the classifier predicts, from which encoders and layers, how to use it."""
        cfg = self.config
        rows = [
            f"| `{e.spec.key}` | `{e.spec.name}` | {', '.join(map(str, self.layers[k]))} "
            f"(of 0..{e.num_layers - 1}) | {e.spec.pooling} | {e.max_length} |"
            for k, e in self.encoders.items()
        ]
        args = ", ".join(f"{k} {v}" for k, v in cfg["head_args"].items())
        trained = cfg.get("trained") or {}
        score = (
            f"\nBest `{trained['monitor']}` during training: {trained['best_score']:.4f}.\n"
            if trained.get("monitor") and trained.get("best_score") is not None
            else ""
        )
        return f"""# layerfusion classifier

A `{cfg["head"]}` fusion head ({args}) over frozen pretrained encoders, predicting
{len(self.label_names)} labels: {", ".join(f"`{n}`" for n in self.label_names)}.
{score}
| encoder | model | layers read (0 = embeddings) | pooling | max tokens |
|---|---|---|---|---|
{chr(10).join(rows)}

The encoder weights are not in this folder: each is loaded by its model name (a local directory,
`$LAYERFUSION_MODELS`, or the Hugging Face hub) and checked against the SHA-256 of the weights the
head was trained on (`encoder_ids` in `{CONFIG_FILE}`). The head is `{WEIGHTS_FILE}`.

```python
from layerfusion import Classifier

clf = Classifier.load("path/to/this/folder")  # device="cuda", compute_dtype="bfloat16", ...
clf.predict(["a text to classify"])  # array of labels (scikit-learn); predict_proba: [N, C]
clf(["a text to classify"], top_k=2)  # [[{{"label": ..., "score": ...}}, ...]] (transformers pipeline)
clf.encode(["a text to classify"])  # [N, width] fused representation (sentence-transformers)
```

Command line: `python -m layerfusion classify path/to/this/folder "a text" "another"`.
"""


# ----------------------------------------------------------------------------- helpers


def _check_config(config: dict[str, Any]) -> None:
    """Fail with the missing or wrong setting rather than deep inside the model."""
    needed = ("label_names", "head", "head_args", "layers", "encoders", "encoder_ids")
    missing = [k for k in needed if k not in config]
    if missing:
        raise CheckpointError(f"classifier settings lack {missing}")
    if config["head"] not in HEADS:
        raise CheckpointError(
            f"classifier has head {config['head']!r}, which this layerfusion does not know; "
            f"known heads: {', '.join(HEADS)}"
        )
    known = {f.name for f in fields(EncoderSpec)}
    unknown = sorted({k for e in config["encoders"] for k in e} - known)
    if unknown:
        raise CheckpointError(
            f"classifier encoder settings have fields this layerfusion lacks: {unknown}"
        )
    keys = [EncoderSpec(**e).key for e in config["encoders"]]
    if set(keys) != set(config["layers"]):
        raise CheckpointError(
            f"classifier layers are given for {sorted(config['layers'])}, encoders are {keys}"
        )


def _check_weights(encoder: FrozenEncoder, trained: dict[str, Any] | None) -> None:
    """The encoder must be the one the head was trained on: weights, depth, tokenizer, max_length."""
    if trained is None:
        raise CheckpointError(f"classifier has no weight hash for encoder {encoder.spec.key!r}")
    encoder.check_identity(trained)


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    """The texts as a list (a single string is one text); a non-string or blank text raises naming it."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] is a {type(text).__name__}, not a str")
        check_text(text, f"texts[{i}]")
    return texts


def check_text(text: str, where: str) -> None:
    """Refuse an empty or whitespace-only text, as training does (no text, no prediction)."""
    if not text.strip():
        raise InputError(
            f"{where} is {'empty' if not text else 'whitespace only'}: layerfusion refuses such texts "
            "(as in training, where a row without text is an error); drop or fill them"
        )


def _normalize(x: np.ndarray) -> np.ndarray:
    """Unit length along the last axis (a zero vector stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


def _training_summary(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Where the head came from: the checkpoint, its epoch, the best monitored score."""
    out: dict[str, Any] = {"checkpoint": str(path), "epoch": ckpt.get("epoch")}
    for name, state in (ckpt.get("callbacks") or {}).items():
        if str(name).startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            out["monitor"] = state.get("monitor")
            out["best_score"] = float(state["best_model_score"])
            break
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _our_card(folder: Path) -> bool:
    """Whether the folder's README.md is the model card a previous `save` wrote, unedited."""
    try:
        recorded = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("card_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded is not None and _sha256(folder / CARD_FILE) == recorded


__all__ = ["Classifier", "InputError", "read_checkpoint"]
