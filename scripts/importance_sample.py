"""Does layer importance on a train sample pick the layers it picks on the whole train split?

    python scripts/importance_sample.py --config configs/sst2.yaml [--sample 4000] [--seeds 0 1 2 3 4]
        [--full-seeds 1 2 3 4] [--other-dtype float32] [--encoders all-MiniLM-L6-v2 ...]
        [--cache /tmp/lf/imp_cache] [--real-extraction-check]

For the dataset and encoders of `--config` (its `LayerImportance` settings, top-k of its `LayerSelection`),
runs the real callbacks in a real `Trainer.fit` that stops before the first epoch (`max_epochs=0`):

- `full`: `LayerImportance(max_train_rows=None, max_dev_rows=None, seed=0)`: every train and dev row;
- per seed s: `LayerImportance(max_train_rows=--sample, max_dev_rows=None, seed=s)`: a stratified
  sample of train (its attention-entropy texts are drawn from the sample with the same seed);
- `--full-seeds`: every row again with other seeds (only the attention-entropy texts differ);
- `--other-dtype`: every row again with the encoders computing in that dtype (e.g. float32 against the
  config's `auto`, bf16 on a CPU with bf16 units): the features are extracted again in that dtype.

Each alternative selection is compared with the full-data one by overlap, Jaccard index and the dev
probe accuracy it gives up (its layers' mean full-data probe accuracy below the full-data top-k's).

The features of a sample's rows are the rows of the full split's cache entry (the same encoder on the
same text; extracting each 4,000-row sample again would cost most of the run on this CPU): the callback
asks `extract_split` for the sampled texts and gets those rows. `--real-extraction-check` runs the first
seed once more with the features extracted for the sampled texts themselves, as a fit would, and
reports whether the table differs.

Writes `<out>/<name>.json` (per seed: selected layers per encoder, overlap with the full-data top-k,
Spearman correlation of the layer scores, full-data score and probe accuracy of the chosen layers against
the full-data top-k; timings) and `<out>/<name>.md` (a short summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from layerfusion.run_paths import read_config

REPO = Path(__file__).resolve().parents[1]
IMPORTANCE = "layerfusion.callbacks.LayerImportance"
SELECTION = "layerfusion.callbacks.LayerSelection"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a dataset config, e.g. configs/sst2.yaml")
    parser.add_argument("--name", help="result name (default: the config's stem)")
    parser.add_argument("--sample", type=int, default=4000, help="train rows of each sample")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--encoders", nargs="+", help="encoder keys to keep (default: all)")
    parser.add_argument("--cache", default="/tmp/lf/imp_cache", help="feature cache directory")
    parser.add_argument("--out", default=str(REPO / "results" / "importance_sample"))
    parser.add_argument(
        "--full-seeds",
        type=int,
        nargs="*",
        default=[],
        help="also score all rows with these seeds (only the attention-entropy sample differs): the "
        "selection's own seed noise, against which the samples' differences compare",
    )
    parser.add_argument(
        "--other-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="also score all rows with the encoders computing in this dtype",
    )
    parser.add_argument("--real-extraction-check", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from layerfusion.cli import log_to_stderr

    log_to_stderr()
    name = args.name or Path(args.config).stem
    cfg = read_config(args.config)
    specs = cfg["model"]["encoders"]
    if args.encoders:
        specs = [s for s in specs if _key(s) in args.encoders]
        if [_key(s) for s in specs] != args.encoders:
            raise SystemExit(
                f"--encoders {args.encoders}: the config has {[_key(s) for s in cfg['model']['encoders']]}"
            )
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in cfg["trainer"]["callbacks"]}
    scoring = callbacks.get(IMPORTANCE, {})
    k = callbacks.get(SELECTION, {}).get("k", 3)

    full = score(cfg, specs, args.cache, scoring, k, None, 0, sliced=False)
    logging.getLogger(__name__).info("full: %s", full["selection"])
    runs = []
    for seed in args.seeds:
        run = score(cfg, specs, args.cache, scoring, k, args.sample, seed, sliced=True)
        runs.append({"seed": seed, **compare(run, full, k)})
        print(f"[{name}] seed {seed}: {runs[-1]['selection']} overlap {runs[-1]['overlap']}")
    full_seeds = []
    for seed in args.full_seeds:
        run = score(cfg, specs, args.cache, scoring, k, None, seed, sliced=False)
        full_seeds.append({"seed": seed, **compare(run, full, k)})
        print(
            f"[{name}] all rows, seed {seed}: {run['selection']} overlap {full_seeds[-1]['overlap']}"
        )
    summary = {
        "dataset": cfg["data"]["dataset"],
        "config": args.config,
        "encoders": [s["name"] for s in specs],
        "max_length": [s.get("max_length", 128) for s in specs],
        "scoring": scoring,
        "top_k": k,
        "train_rows": full["rows"]["train"],
        "dev_rows": full["rows"]["val"],
        "sample_rows": args.sample,
        "full": full,
        "samples": runs,
        "by_encoder": by_encoder(runs, k),
    }
    if full_seeds:
        summary["full_other_seeds"] = full_seeds
        summary["full_other_seeds_by_encoder"] = by_encoder(full_seeds, k)
    if args.other_dtype:
        run = score(cfg, specs, args.cache, scoring, k, None, 0, False, dtype=args.other_dtype)
        summary["other_dtype"] = {"dtype": args.other_dtype, **compare(run, full, k)}
        print(f"[{name}] all rows in {args.other_dtype}: {run['selection']}")
    if args.real_extraction_check:
        seed = args.seeds[0]
        real = score(cfg, specs, args.cache, scoring, k, args.sample, seed, sliced=False)
        sliced = next(r for r in runs if r["seed"] == seed)
        summary["real_extraction_check"] = {
            "seed": seed,
            "selection": real["selection"],
            "same_selection_as_sliced": real["selection"] == sliced["selection"],
            "max_abs_score_difference": max(
                abs(a - b)
                for e in real["scores"]
                for a, b in zip(real["scores"][e], sliced["scores"][e], strict=True)
            ),
            "extract_seconds": real["seconds"].get("extract"),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(name, summary))
    print((out / f"{name}.md").read_text())


def score(
    cfg: dict,
    specs: list[dict],
    cache: str,
    scoring: dict,
    k: int,
    sample: int | None,
    seed: int,
    sliced: bool,
    dtype: str | None = None,
) -> dict:
    """The importance table and top-k selection of one `LayerImportance` run (a fit stopped before training)."""
    import lightning as L
    import torch
    from layerfusion.callbacks import LayerImportance, LayerSelection

    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.encoders.frozen import EncoderSpec
    from layerfusion.module import LayerFusionModule

    L.seed_everything(cfg.get("seed_everything", 42), verbose=False)
    encoders = [EncoderSpec(**{**s, **({"compute_dtype": dtype} if dtype else {})}) for s in specs]
    dm = TextClassificationDataModule(
        dataset=cfg["data"]["dataset"], encoders=encoders, batch_size=cfg["data"]["batch_size"]
    )
    model = LayerFusionModule(encoders, label_names=dm.label_names, cache_dir=cache)
    if sliced:
        real = model.extract_split

        def extract_split(texts, split, *rest, **kw):
            """The sampled texts' rows of the full split's features (the same text has the same features)."""
            whole = dm.texts(split)
            features = real(whole, split, *rest, **kw)
            if texts is whole:
                return features
            first = {}
            for i, text in enumerate(whole):
                first.setdefault(text, i)
            rows = torch.tensor([first[t] for t in texts])
            return {e: x[rows] for e, x in features.items()}

        model.extract_split = extract_split
    importance = LayerImportance(
        **{**scoring, "max_train_rows": sample, "max_dev_rows": None, "seed": seed},
        dirpath=str(Path(cache) / "tables"),
        # a sliced run and a real-extraction run of the same sample share inputs: keep them apart
        cache=sliced or sample is None,
    )
    selection = LayerSelection(strategy="top_k", k=k)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(Path(cache) / "runs"),
        callbacks=[importance, selection],
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    table = importance.table
    return {
        "selection": model.selection,
        "scores": {e: [r.score for r in table if r.encoder == e] for e in model.selection},
        "probe_acc": {e: [r.probe_acc for r in table if r.encoder == e] for e in model.selection},
        "table": [asdict(r) for r in table],
        "rows": {s: len(dm.texts(s)) for s in ("train", "val")},
        "seconds": {c: round(v, 1) for c, v in importance.seconds.items()},
        "wall_seconds": round(time.perf_counter() - start, 1),
        "from_cache": importance.seconds == {},
    }


def compare(run: dict, full: dict, k: int) -> dict:
    """A sample's selection against the full-data one, per encoder."""
    out = {"selection": run["selection"], "overlap": {}, "spearman": {}, "score_shortfall": {}}
    out["probe_acc_shortfall"], out["jaccard"] = {}, {}
    for e, chosen in run["selection"].items():
        best = full["selection"][e]
        scores, acc = full["scores"][e], full["probe_acc"][e]
        out["overlap"][e] = len(set(chosen) & set(best))
        out["jaccard"][e] = round(len(set(chosen) & set(best)) / len(set(chosen) | set(best)), 4)
        out["spearman"][e] = round(spearman(run["scores"][e], scores), 4)
        # what choosing from the sample costs, measured on the full data: the mean full-data score and
        # probe accuracy of the sample's layers below those of the full-data top-k
        out["score_shortfall"][e] = round(_mean(scores, best) - _mean(scores, chosen), 4)
        out["probe_acc_shortfall"][e] = round(_mean(acc, best) - _mean(acc, chosen), 4)
    out["seconds"], out["wall_seconds"] = run["seconds"], run["wall_seconds"]
    out["scores"] = run["scores"]
    return out


def by_encoder(runs: list[dict], k: int) -> dict:
    """Per encoder, over seeds: how often the sample picks exactly the full-data layers, and overlaps."""
    out = {}
    for e in runs[0]["overlap"]:
        overlaps = [r["overlap"][e] for r in runs]
        out[e] = {
            "exact": f"{sum(o == k for o in overlaps)}/{len(runs)}",
            "overlaps": overlaps,
            "mean_jaccard": round(sum(r["jaccard"][e] for r in runs) / len(runs), 4),
            "mean_spearman": round(sum(r["spearman"][e] for r in runs) / len(runs), 4),
            "min_spearman": min(r["spearman"][e] for r in runs),
            "max_probe_acc_shortfall": max(r["probe_acc_shortfall"][e] for r in runs),
        }
    return out


def markdown(name: str, s: dict) -> str:
    lines = [
        f"# {name}: layer importance on a {s['sample_rows']:,}-row train sample vs all "
        f"{s['train_rows']:,} train rows",
        "",
        f"Encoders {', '.join(s['encoders'])} (max length {s['max_length']}); dev: all "
        f"{s['dev_rows']:,} rows; top-{s['top_k']} per encoder; seeds "
        f"{', '.join(str(r['seed']) for r in s['samples'])}. Full-data selection: {s['full']['selection']}.",
        "",
        "Full-data scores, best four per encoder (a near tie at the k-th place is where samples differ): "
        + "; ".join(
            f"{e}: "
            + ", ".join(
                f"L{i} {v:.3f}"
                for i, v in sorted(enumerate(scores), key=lambda iv: -iv[1])[: s["top_k"] + 1]
            )
            for e, scores in s["full"]["scores"].items()
        )
        + ".",
        "",
        "| seed | encoder | sample's top-k | overlap | Jaccard | Spearman | probe-acc shortfall |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in s["samples"]:
        for e, chosen in r["selection"].items():
            lines.append(
                f"| {r['seed']} | {e} | {chosen} | {r['overlap'][e]}/{s['top_k']} | "
                f"{r['jaccard'][e]:.2f} | {r['spearman'][e]:.3f} | {r['probe_acc_shortfall'][e]:+.4f} |"
            )
    lines += ["", "Per encoder over seeds:", ""]
    for e, v in s["by_encoder"].items():
        lines.append(
            f"- {e}: exactly the full-data layers in {v['exact']} seeds, overlaps {v['overlaps']}, "
            f"Jaccard mean {v['mean_jaccard']:.2f}, Spearman mean {v['mean_spearman']:.3f} (min {v['min_spearman']:.3f}), largest probe-acc "
            f"shortfall {v['max_probe_acc_shortfall']:+.4f}"
        )
    if "full_other_seeds" in s:
        seeds = ", ".join(str(r["seed"]) for r in s["full_other_seeds"])
        lines += [
            "",
            f"All train rows with seeds {seeds} instead of 0 (the rows are the same; only the 256 texts of "
            "attention entropy differ) against seed 0:",
            "",
        ]
        for e, v in s["full_other_seeds_by_encoder"].items():
            lines.append(
                f"- {e}: the same layers in {v['exact']} seeds, overlaps {v['overlaps']}, Jaccard mean "
                f"{v['mean_jaccard']:.2f}, Spearman mean "
                f"{v['mean_spearman']:.3f} (min {v['min_spearman']:.3f}), largest probe-acc shortfall "
                f"{v['max_probe_acc_shortfall']:+.4f}"
            )
    other = s.get("other_dtype")
    if other:
        lines += [
            "",
            f"All train rows with the encoders in {other['dtype']} against the config's dtype:",
            "",
        ]
        for e, chosen in other["selection"].items():
            lines.append(
                f"- {e}: {chosen} (overlap {other['overlap'][e]}/{s['top_k']}, Jaccard "
                f"{other['jaccard'][e]:.2f}, Spearman {other['spearman'][e]:.3f}, probe-acc shortfall "
                f"{other['probe_acc_shortfall'][e]:+.4f})"
            )
    check = s.get("real_extraction_check")
    if check:
        lines += [
            "",
            f"Real extraction of seed {check['seed']}'s sample (instead of full-split rows): selection "
            f"{check['selection']}, same as sliced: {check['same_selection_as_sliced']}, largest score "
            f"difference {check['max_abs_score_difference']:.2e}.",
        ]
    lines += [
        "",
        "Probe-acc shortfall: mean full-data dev probe accuracy of the full-data top-k minus that of the "
        "sample's top-k (0 when the sets match).",
        "",
    ]
    return "\n".join(lines)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2
        i = j + 1
    return ranks


def _mean(values: list[float], layers: list[int]) -> float:
    return sum(values[i] for i in layers) / len(layers)


def _key(spec: dict) -> str:
    return spec.get("alias") or spec["name"].rstrip("/").split("/")[-1]


if __name__ == "__main__":
    main()
