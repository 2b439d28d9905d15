"""`Classifier`: a trained fusion head and its frozen encoders, classifying strings in Python (no Trainer)."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from layerfusion.encoders.frozen import ComputeDtype, EncoderSpec, FrozenEncoder
from layerfusion.encoders.offline import no_loading_bars
from layerfusion.errors import CheckpointError, ConfigError
from layerfusion.files import atomic_write as _write_atomic
from layerfusion.fusion.heads import HEADS, build_head

FORMAT, VERSION = "layerfusion-classifier", 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "classifier.json", "head.safetensors", "README.md"


class Classifier:
    """A trained layerfusion model as one object: `predict(texts)` gives labels and class probabilities.

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
        batch_size: texts per forward pass.
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
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ) -> None:
        _check_config(config)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.label_names: list[str] = list(config["label_names"])
        self.layers: dict[str, list[int]] = {k: list(v) for k, v in config["layers"].items()}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
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
            raise CheckpointError(
                f"{folder} has no {CONFIG_FILE}: it is not a folder written by Classifier.save"
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
        return cls(config, state, **kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the head (safetensors), its settings (classifier.json) and a model card (README.md) to a folder."""
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        _write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, {"format": "pt"}))
        text = json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"
        _write_atomic(
            folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8")
        )
        card = self.model_card()
        _write_atomic(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
        return folder

    # -- inference -------------------------------------------------------------------------------

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One `{"label": name, "probs": {name: probability}}` per text, in the order given."""
        probs = self.predict_proba(texts)
        return [
            {
                "label": self.label_names[int(p.argmax())],
                "probs": dict(zip(self.label_names, p.tolist())),
            }
            for p in probs
        ]

    @torch.inference_mode()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities `[N, C]` (columns in `label_names` order), float32 on the CPU."""
        texts = _check_texts(texts)
        out = torch.empty(len(texts), len(self.label_names))
        # longest first, as in feature extraction: batches of similar length carry few pad tokens
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = [texts[i] for i in rows]
            features = {key: self._encode(key, batch) for key in self.encoders}
            out[rows] = torch.softmax(self.head(features).float(), dim=-1).cpu()
        return out

    def _encode(self, key: str, texts: list[str]) -> torch.Tensor:
        """Pooled layers `0..deepest selected` of one encoder for a batch of texts, `[B, k, d]`."""
        encoder = self.encoders[key]
        inputs = encoder.tokenizer(
            texts,
            truncation=True,
            max_length=encoder.max_length,
            padding=True,
            return_tensors="pt",
        )
        return encoder(
            inputs["input_ids"].to(self.device),
            inputs["attention_mask"].to(self.device),
            depth=max(self.layers[key]),
        )

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
clf.predict(["a text to classify"])  # [{{"label": ..., "probs": {{label: probability}}}}]
```

Command line: `python -m layerfusion classify path/to/this/folder "a text" "another"`.
"""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A layerfusion checkpoint loaded on the CPU (tensors and containers only, no code), checked to be one."""
    path = Path(path)
    if path.is_dir():
        hint = (
            " (a folder written by Classifier.save: load it with Classifier.load)"
            if (path / CONFIG_FILE).is_file()
            else ""
        )
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as err:  # torch.load fails in many ways on other files (IndexError, EOFError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in reason:
            reason = "it holds pickled Python objects, not only tensors"
        raise CheckpointError(
            f"{path} is not a layerfusion checkpoint: torch.load cannot read it ({reason[:200]})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} is not a layerfusion checkpoint: it holds a {type(ckpt).__name__}, not a checkpoint dict"
        )
    if "layerfusion" not in ckpt:
        what = (
            "a Lightning checkpoint of another model"
            if "pytorch-lightning_version" in ckpt
            else "a PyTorch file from another program"
        )
        keys = ", ".join(map(str, list(ckpt)[:6]))
        raise CheckpointError(
            f"{path} was not written by layerfusion: {what} (no 'layerfusion' section; keys: {keys})"
        )
    meta = ckpt["layerfusion"]
    missing = [k for k in ("encoders", "label_names", "head", "selection") if k not in meta]
    foreign = [k for k in ckpt.get("state_dict", {}) if not k.startswith("head.")]
    if missing or "state_dict" not in ckpt or foreign:
        problem = (
            f"its 'layerfusion' section lacks {missing}"
            if missing
            else "it has no state_dict"
            if "state_dict" not in ckpt
            else f"its state_dict has weights outside the head (e.g. {foreign[:3]})"
        )
        raise CheckpointError(f"{path} is not a usable layerfusion checkpoint: {problem}")
    return ckpt


def main(argv: Sequence[str] | None = None) -> int:
    """`layerfusion classify MODEL [TEXT ...] [--file FILE]`: one JSON line per input text."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="layerfusion classify",
        description="Classify texts with a trained model: a fit checkpoint (.ckpt) or a folder "
        "written by Classifier.save. Prints one JSON line per text: text, label, probabilities.",
    )
    parser.add_argument(
        "model", metavar="CKPT_OR_DIR", help="a .ckpt file or a saved classifier folder"
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    parser.add_argument(
        "--file",
        help="read texts from a file: JSON Lines (.jsonl, .jsonl.gz: the --text-field of each object) "
        "or plain text (one text per line); blank lines are skipped; '-' reads standard input",
    )
    parser.add_argument(
        "--text-field", default="text", help="JSON field holding the text (default: text)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument(
        "--compute-dtype",
        default=None,
        choices=["auto", "float32", "tfloat32", "bfloat16", "float16"],
        help="precision of the encoders (default: as trained)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="texts per forward pass (default: 64)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the encoders' model directories run their own Python code (a value stored in the "
        "model file is never used)",
    )
    args = parser.parse_args(argv)
    texts = list(args.texts)
    if args.file:
        texts += read_texts(args.file, args.text_field)
    if not texts:
        parser.error("no texts: give them as arguments or with --file")
    kwargs = {
        "device": args.device,
        "compute_dtype": args.compute_dtype,
        "batch_size": args.batch_size,
        "trust_remote_code": args.trust_remote_code,
    }
    model = Path(args.model)
    clf = (
        Classifier.load(model, **kwargs)
        if model.is_dir()
        else Classifier.from_checkpoint(model, **kwargs)
    )
    for text, row in zip(texts, clf.predict(texts)):
        sys.stdout.write(json.dumps({"text": text, **row}, ensure_ascii=False) + "\n")
    return 0


def read_texts(path: str, text_field: str = "text") -> list[str]:
    """Texts from a JSON Lines file (`text_field` of each object) or a plain text file (one per line)."""
    import gzip
    import sys

    from layerfusion.errors import LayerFusionError

    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
                raw = fh.read()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise LayerFusionError(f"--file {name}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LayerFusionError(f"--file {name}: cannot read it as UTF-8 text ({err})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # not splitlines: U+2028 is text
    if not path.removesuffix(".gz").endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LayerFusionError(f"{name}:{number}: malformed JSON ({err.msg})") from None
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            got = f"keys {sorted(row)}" if isinstance(row, dict) else f"a {type(row).__name__}"
            raise LayerFusionError(f"{name}:{number}: no string field {text_field!r} ({got})")
        texts.append(value)
    return texts


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


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("predict takes a list of strings; wrap a single text as [text]")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is a {type(texts[bad]).__name__}, not a str")
    return texts


def _training_summary(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Where the head came from: the checkpoint, its epoch, the best monitored score."""
    out: dict[str, Any] = {"checkpoint": str(path), "epoch": ckpt.get("epoch")}
    for name, state in (ckpt.get("callbacks") or {}).items():
        if str(name).startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            out["monitor"] = state.get("monitor")
            out["best_score"] = float(state["best_model_score"])
            break
    return out


__all__ = ["Classifier", "read_checkpoint"]
