"""`Classifier`: a trained fusion head and its frozen encoders, classifying strings in Python (no Trainer)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from layerfusion.checkpoint import read_checkpoint  # noqa: F401 (public here too)
from layerfusion.classifier_folder import (  # noqa: F401 (FORMAT, VERSION and the file names: public here too)
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    VERSION,
    WEIGHTS_FILE,
    check_config,
    model_card,
    read_fit_checkpoint,
    read_folder,
    write_folder,
)
from layerfusion.encoders.frozen import ComputeDtype, EncoderSpec, FrozenEncoder
from layerfusion.encoders.offline import no_loading_bars
from layerfusion.errors import CheckpointError, ConfigError, LayerFusionError
from layerfusion.features.extraction import TOKEN_BUDGET, extract_chunk
from layerfusion.fusion.heads import build_head

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
        check_config(config)
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
        return cls(*read_fit_checkpoint(path), **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> Classifier:
        """The classifier in a folder written by `save` (JSON and safetensors only, no pickle)."""
        return cls(*read_folder(directory), **kwargs)

    def save(self, directory: str | os.PathLike, overwrite_readme: bool = False) -> Path:
        """Write the head (safetensors), its settings (classifier.json) and a model card (README.md) to a folder.

        The folder is written as a set: every file is first written under a temporary name, then
        classifier.json is removed, the others are renamed into place, and classifier.json (which
        records the head's SHA-256) comes last. `load` requires it, so a save interrupted at any point
        never leaves a loadable folder that pairs a new head with an old config. An existing
        README.md is replaced only when a previous `save` wrote it unchanged, or `overwrite_readme`.
        """
        card = self.model_card()
        return write_folder(directory, self.config, self.head.state_dict(), card, overwrite_readme)

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
        return model_card(self.config, self.encoders)


# ----------------------------------------------------------------------------- helpers


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


__all__ = ["Classifier", "InputError", "read_checkpoint"]
