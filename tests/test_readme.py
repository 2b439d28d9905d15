"""README's walk-through runs as written: the blocks marked `<!-- readme-test: run -->` (quickstart ->
own CSV -> Classifier -> classify) are executed in order, in a directory whose `configs/` holds the
shipped configs cut down to MiniLM, a 32-token limit, slices of the data and 1-2 epochs, and whose
`data/train.csv` is a small CSV with the README's columns. Install and model download are skipped."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import MINILM, REPO

from layerfusion.__main__ import SUBCOMMANDS, main

README = REPO / "README.md"
MARK = "<!-- readme-test: run -->"


def blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, code, marked to run) of every fenced block, in order."""
    out = []
    for m in re.finditer(r"(?ms)^```(\w*)\n(.*?)^```", text):
        before = text[: m.start()].rstrip().splitlines()
        out.append((m.group(1), m.group(2), bool(before) and before[-1].strip() == MARK))
    return out


def commands(code: str) -> list[list[str]]:
    """The `layerfusion ...` command lines of a shell block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [
        shlex.split(line, comments=True)
        for line in joined.splitlines()
        if line.strip().startswith("layerfusion ")
    ]


def test_readme_is_a_users_guide():
    text = README.read_text()
    assert len(text.splitlines()) <= 370  # a guide, not the reference: details live in docs/
    assert "make test" in text  # CI runs it
    assert "../" not in text and "/work/" not in text  # no paths outside the repository
    for cmd in (c for lang, code, _ in blocks(text) if lang == "bash" for c in commands(code)):
        assert cmd[1] in (*SUBCOMMANDS, "--help"), cmd
    for link in re.findall(r"\]\(((?:docs|configs|results)/[^)#]+)", text):
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_readme_lists_the_heads_as_the_code_does():
    from layerfusion.__main__ import _heads

    table = README.read_text().split("### Heads")[1].split("\n## ")[0]
    rows = [r.split("|")[1:3] for r in table.splitlines() if r.startswith("| `")]
    readme = [(name.strip().strip("`"), doc.strip()) for name, doc in rows]
    assert readme == [tuple(h.split(None, 1)) for h in _heads()]


def test_the_layout_lists_every_module():
    layout = (REPO / "docs" / "development.md").read_text().split("## Layout")[1]
    modules = [p for d in ("layerfusion", "callbacks") for p in (REPO / d).rglob("*.py")]
    missing = [
        str(p.relative_to(REPO))
        for p in modules
        if p.name != "__init__.py" and p.name not in layout
    ]
    assert not missing, f"docs/development.md's Layout does not list {missing}"


@pytest.fixture
def sandbox(tmp_path, shared_data, monkeypatch) -> Path:
    """A working directory with cut-down `configs/` and the README's `data/train.csv`."""
    (tmp_path / "configs").mkdir()
    for name in ("quickstart", "custom"):
        cfg = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        cfg["model"]["encoders"] = [
            {"name": MINILM, "pooling": "mean", "max_length": 32, "compute_dtype": "float32"}
        ]
        cfg["model"]["cache_dir"] = str(tmp_path / "cache")
        trainer = cfg["trainer"]
        trainer.update(max_epochs=1, enable_progress_bar=False, enable_model_summary=False)
        trainer["logger"] = {  # W&B's offline runs are tested in test_cli, in their own processes
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "${trainer.default_root_dir}"},
        }
        for cb in trainer["callbacks"]:
            if cb["class_path"].endswith("LayerImportance"):
                cb["init_args"].update(max_train_rows=96, max_dev_rows=32, attention_samples=8)
        if name == "quickstart":
            cfg["data"].update(data_dir=str(shared_data), max_train_samples=96, max_eval_samples=48)
        (tmp_path / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "data").mkdir()
    rows = [json.loads(line) for line in (shared_data / "sst2" / "train.jsonl").open()][:120]
    names = {"0": "negative", "1": "positive"}
    lines = ["review,sentiment"] + [
        '"{}",{}'.format(r["text"].strip().replace('"', '""'), names[r["label"]]) for r in rows
    ]
    (tmp_path / "data" / "train.csv").write_text("\n".join(lines) + "\n")
    from layerfusion.encoders.offline import MODELS_ENV, models_dir

    monkeypatch.setenv(MODELS_ENV, str(models_dir()))
    monkeypatch.setenv("HOME", str(tmp_path))  # the API example's default feature cache goes here
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["layerfusion"])
    return tmp_path


def test_readme_walkthrough_runs_as_written(sandbox, capsys):
    ran = []
    for lang, code, run in blocks(README.read_text()):
        if not run:
            continue
        if lang == "bash":
            for cmd in commands(code):
                assert cmd[0] == "layerfusion"
                try:
                    main(cmd[1:])
                except SystemExit as done:
                    assert done.code in (0, None), f"{' '.join(cmd)} exited {done.code}"
                ran.append(cmd[1])
        else:
            exec(compile(code, "README.md", "exec"), {})
            ran.append("python")
    assert ran == ["fit", "test", "fit", "python", "classify", "python"]
    out = capsys.readouterr().out
    assert (sandbox / "runs" / "quickstart" / "checkpoints" / "best.ckpt").is_file()
    assert "test_acc" in out
    assert (sandbox / "runs" / "reviews" / "checkpoints" / "best.ckpt").is_file()
    assert (sandbox / "runs" / "reviews" / "importance.csv").is_file()
    assert (sandbox / "models" / "reviews" / "classifier.json").is_file()
    printed = [json.loads(line) for line in out.splitlines() if line.startswith('{"text"')]
    assert [p["text"] for p in printed] == ["a gripping film", "dull"]
    labels = {"negative", "positive"}
    assert all(p["label"] in labels and set(p["probs"]) == labels for p in printed), printed
    assert (sandbox / ".cache" / "layerfusion" / "features").is_dir()  # the API example's cache
