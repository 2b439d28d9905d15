"""Evidence for layer importance and selection on a real dataset: the importance table, the selected layers,
and dev/test accuracy of gated fusion over the selected layers vs over each encoder's last layer only.

    python scripts/importance_evidence.py --config configs/sst2.yaml [--seed 42] [--repeat]

Runs in one process through the project's own `LightningCLI` (same config, same links), with the logger
swapped for a CSVLogger and every run in its own directory `runs/<name>-evidence/<variant>-seed<seed>`:

- `selected`: the config as it is (LayerImportance + LayerSelection), fit, then validate and test the best
  checkpoint (test restores the selection from it);
- `last_layers`: the same config and seed without the two callbacks, `model.layers` = each encoder's last layer;
- `--all-layers`: the same config and seed without the two callbacks, every layer of every encoder (context);
- `--repeat`: `selected` a second time, to check that the same seed gives the same table and selection.

Writes `results/importance/<name>.csv` (the table) and `<name>.json` (selection, accuracies, timings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from layerfusion.run_paths import read_config

REPO = Path(__file__).resolve().parents[1]
SCORING = ("layerfusion.callbacks.LayerImportance", "layerfusion.callbacks.LayerSelection")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a dataset config, e.g. configs/sst2.yaml")
    parser.add_argument("--name", help="result name (default: the config's stem)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(REPO / "results" / "importance"))
    parser.add_argument("--repeat", action="store_true", help="run `selected` twice and compare")
    parser.add_argument("--all-layers", action="store_true", help="also fit over every layer")
    args = parser.parse_args()
    name = args.name or Path(args.config).stem
    base = read_config(args.config)
    root = REPO / "runs" / f"{name}-evidence"

    runs = {"selected": run(variant(base, root, "selected", args.seed), "selected")}
    keys = [e["name"].rstrip("/").split("/")[-1] for e in base["model"]["encoders"]]
    runs["last_layers"] = run(
        variant(base, root, "last_layers", args.seed, last=keys), "last_layers"
    )
    if args.all_layers:
        runs["all_layers"] = run(
            variant(base, root, "all_layers", args.seed, last=None, scoring=False), "all_layers"
        )
    if args.repeat:
        runs["selected_repeat"] = run(
            variant(base, root, "selected_repeat", args.seed), "selected_repeat"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs["selected"]["table_csv"], out / f"{name}.csv")
    summary = {
        "dataset": base["data"]["dataset"],
        "config": str(Path(args.config)),
        "seed": args.seed,
        "encoders": [e["name"] for e in base["model"]["encoders"]],
        "max_length": [e.get("max_length", 128) for e in base["model"]["encoders"]],
        "scoring": {
            cb["class_path"].split(".")[-1]: cb.get("init_args", {})
            for cb in base["trainer"]["callbacks"]
            if cb["class_path"] in SCORING
        },
        "runs": {
            k: {m: v for m, v in r.items() if m not in ("table", "table_csv")}
            for k, r in runs.items()
        },
        "top_layers": top_layers(runs["selected"]["table"]),
    }
    if args.repeat:
        a, b = runs["selected"], runs["selected_repeat"]
        summary["same_seed_same_table"] = a["table"] == b["table"]
        summary["same_seed_same_selection"] = a["selection"] == b["selection"]
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "scoring"}, indent=1))


def variant(
    base: dict,
    root: Path,
    label: str,
    seed: int,
    last: list[str] | None = None,
    scoring: bool = True,
) -> Path:
    """A copy of the config for one run: own directories, CSV logger, seed; `last` (encoder keys): each
    encoder's last layer and no scoring; `scoring=False`: no scoring, every layer."""
    run_dir = root / f"{label}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    old_root = base["trainer"]["default_root_dir"]
    cfg = yaml.safe_load(yaml.safe_dump(base).replace(old_root, str(run_dir)))
    cfg["seed_everything"] = seed
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "logs"},
    }
    if last is not None or not scoring:
        cfg["trainer"]["callbacks"] = [
            c for c in cfg["trainer"]["callbacks"] if c["class_path"] not in SCORING
        ]
    if last is not None:
        cfg["model"]["layers"] = {k: [-1] for k in last}
    path = Path(tempfile.mkdtemp()) / f"{label}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, label: str) -> dict:
    """fit, then validate and test the best checkpoint; accuracies, selection, table and timings."""
    from layerfusion.callbacks import LayerImportance
    from lightning.pytorch.cli import SaveConfigCallback

    from layerfusion.cli import build_cli, log_to_stderr

    log_to_stderr()
    cli = build_cli(
        ["--config", str(config)],
        save_config_callback=SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
    )
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    best = trainer.checkpoint_callback.best_model_path
    val = trainer.validate(model, datamodule=dm, ckpt_path=best, verbose=False)[0]
    test = trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)[0]
    importance = next((c for c in trainer.callbacks if isinstance(c, LayerImportance)), None)
    table = [asdict(r) for r in importance.table] if importance else None
    result = {
        "selection": model.selection,
        "val_acc": val["val_acc"],
        "val_f1": val["val_f1"],
        "test_acc": test["test_acc"],
        "test_f1": test["test_f1"],
        "epochs_run": trainer.current_epoch,
        "best_checkpoint": str(best),
        "fit_seconds": round(fit_seconds, 1),
        "importance_seconds": {k: round(v, 1) for k, v in importance.seconds.items()}
        if importance
        else None,
        "table": json.dumps(table) if table else None,  # a string: NaN-safe equality for --repeat
        "table_csv": str(importance.paths[0]) if importance else None,
    }
    print(
        f"[{label}] selection={result['selection']} val_acc={result['val_acc']:.4f} test_acc={result['test_acc']:.4f}"
    )
    return result


def top_layers(table_json: str, n: int = 3) -> dict[str, list[dict]]:
    """The `n` best layers per encoder with their components."""
    rows = json.loads(table_json)
    out = {}
    for e in dict.fromkeys(r["encoder"] for r in rows):
        own = sorted(
            (r for r in rows if r["encoder"] == e), key=lambda r: (-r["score"], -r["layer"])
        )
        out[e] = [
            {k: r[k] for k in ("layer", "score", "probe_acc", "grad_norm", "attention_entropy")}
            for r in own[:n]
        ]
    return out


if __name__ == "__main__":
    main()
