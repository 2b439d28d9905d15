"""The rows without a Lightning training loop: the dev-tuned `linear_probe` (L-BFGS, full batch) and the
`stacking` bound over the probes' log-probabilities."""

from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path

from layerfusion.errors import ConfigError
from layerfusion.files import write_json
from layerfusion.reproduce.grid import L2_GRID, SPLITS
from layerfusion.reproduce.prepare import instantiate
from layerfusion.reproduce.stats import macro_f1


def probe_run(per_run: list[dict], name: str, n: int | None, key: str) -> dict:
    """The first-seed `linear_probe` run of encoder `key` (stacking combines their log-probabilities)."""
    for r in per_run:
        if (r["dataset"], r["train_rows"], r["method"], r["encoders"]) == (
            name,
            n or "",
            "linear_probe",
            key,
        ):
            return r
    raise ConfigError("the stacking row needs the linear_probe row: add linear_probe to --methods")


def stack_one(probes: list[dict], seed: int, run_dir: Path) -> dict:
    """The stacking bound from the encoders' linear_probe log-probabilities (see `stacking.stack`)."""
    import numpy as np

    from layerfusion.analysis import read_predictions, write_predictions
    from layerfusion.reproduce.stacking import stack

    start = time.perf_counter()
    logp = {
        s: [np.load(Path(p["run_dir"]) / f"logprobs_{s}.npy") for p in probes]
        for s in ("val", "test")
    }
    gold = {
        s: read_predictions(Path(probes[0]["run_dir"]) / f"predictions_{s}.csv")
        for s in ("val", "test")
    }
    pred = stack(logp["val"], gold["val"]["gold"], logp["test"], seed=seed)
    for s in ("val", "test"):
        write_predictions(
            run_dir / f"predictions_{s}.csv", gold[s]["index"], pred[s], gold[s]["gold"]
        )
    acc = {s: float((pred[s] == gold[s]["gold"]).mean()) for s in ("val", "test")}
    result = {
        "method": "stacking",
        "encoders": "+".join(p["encoders"] for p in probes),
        "layers": " ".join(p["layers"] for p in probes),
        "seed": seed,
        "test_acc": acc["test"],
        "test_f1": macro_f1(pred["test"], gold["test"]["gold"]),
        "val_acc": acc["val"],
        "epochs": 0,
        "train_s": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "result.json", result)
    return {**result, "reused": False}


def fit_linear_probe(c: dict, run_dir: Path) -> dict:
    """The `linear` head fitted to convergence for each L2 of `L2_GRID`; the best on dev is tested.

    The fit is convex and full-batch, so the seed changes nothing: later seeds of the same model and
    data reuse the first seed's fit (same predictions, same figures)."""
    import torch

    from layerfusion.analysis import write_predictions

    key = json.dumps([c["model"], c["data"]], sort_keys=True, default=str)
    if key not in _PROBES:
        _PROBES.clear()  # one row at a time: keep only the latest
        _PROBES[key] = _probe(c)
    out, preds, state = _PROBES[key]

    import numpy as np

    for s, (index, pred, gold, logp) in preds.items():
        write_predictions(run_dir / f"predictions_{s}.csv", index, pred, gold)
        np.save(run_dir / f"logprobs_{s}.npy", logp)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, run_dir / "checkpoints" / "linear_probe.pt")
    return dict(out)


_PROBES: dict[str, tuple] = {}


def _probe(c: dict) -> tuple[dict, dict, dict]:
    """(figures, predictions per split, head state) of the dev-tuned linear probe of config `c`."""
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    from layerfusion.memory import peak_memory_mb, reset_peak_memory

    gc.collect()
    reset_peak_memory()
    c = copy.deepcopy(c)
    c["trainer"]["logger"] = False  # no Lightning loop runs: nothing to log per step
    trainer, model, dm = instantiate(c)
    dm.setup("fit")
    dm.setup("test")
    device = trainer.strategy.root_device
    head = model.head.to(device)
    feats = {s: model.extract_split(dm.texts(s), s, device) for s in SPLITS}
    gold = {s: torch.tensor(dm.label_ids(s), device=device) for s in SPLITS}

    def logits(split: str) -> torch.Tensor:
        with torch.no_grad():
            return head({k: v.to(device) for k, v in feats[split].items()})

    def predict(split: str) -> torch.Tensor:
        return logits(split).argmax(-1)

    start = time.perf_counter()
    best, iters = None, {}
    for l2 in L2_GRID:
        iters[l2] = head.fit(
            {k: v.to(device) for k, v in feats["train"].items()}, gold["train"], l2
        )
        acc = float((predict("val") == gold["val"]).float().mean())
        if best is None or acc > best[1]:
            best = (l2, acc, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    train_s = time.perf_counter() - start
    logp = {s: torch.log_softmax(logits(s).float(), -1).cpu() for s in ("val", "test")}
    pred = {s: logp[s].argmax(-1) for s in ("val", "test")}
    preds = {
        s: (range(len(pred[s])), pred[s], gold[s].cpu(), logp[s].numpy()) for s in ("val", "test")
    }
    out = {
        "test_acc": float((pred["test"] == gold["test"].cpu()).float().mean()),
        "test_f1": float(
            multiclass_f1_score(
                pred["test"], gold["test"].cpu(), len(model.label_names), average="macro"
            )
        ),
        "val_acc": best[1],
        "l2": best[0],
        "lbfgs_iterations": iters[best[0]],
        "epochs": 0,
        "train_s": train_s,
        "train_peak_mb": peak_memory_mb(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    state = {k: v.cpu().clone() for k, v in head.state_dict().items()}
    del trainer, model, dm
    return out, preds, state
