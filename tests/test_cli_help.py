"""The command line can be discovered from the command line: a fast top-level help listing every
subcommand, `--version`, `list`, help text on every option, one flag style, one line per model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest
from conftest import REPO

from layerfusion.__main__ import SUBCOMMANDS, dashed_options, main

ARGPARSE_COMMANDS = [
    name for name, sub in SUBCOMMANDS.items() if sub.target != "layerfusion.cli:cli_main"
]


def test_top_level_help_is_fast_and_lists_every_subcommand():
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "layerfusion", "--help"], capture_output=True, text=True, cwd=REPO
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: layerfusion ")
    listed = [
        line.split()[0] for line in out.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()
    ]
    assert listed == list(SUBCOMMANDS)
    for name in (
        "fit",
        "validate",
        "test",
        "predict",
        "models",
        "report",
        "reproduce",
        "analyze",
        "classify",
        "list",
    ):
        assert name in SUBCOMMANDS
    assert seconds < 3, f"`layerfusion --help` took {seconds:.1f} s"
    # nothing heavy is imported for it (Lightning alone takes ~12 s)
    probe = (
        "import sys\nfrom layerfusion.__main__ import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_version_and_unknown_command(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"layerfusion {version('layerfusion')}\n"
    with pytest.raises(SystemExit) as exit_:
        main(["fitt"])
    assert exit_.value.code == 2
    assert "unknown command 'fitt'; choose one of fit, " in capsys.readouterr().err


@pytest.fixture
def parsers(monkeypatch):
    """The argparse parser each subcommand builds (captured at parse time; nothing runs)."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    return seen


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_every_option_has_help_and_the_prog_is_layerfusion(name, parsers):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    (parser,) = parsers
    assert parser.prog == f"layerfusion {name}"
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert not undocumented, f"layerfusion {name}: options without help: {undocumented}"


def test_list(capsys):
    from layerfusion.data.sources import NAMED_DATASETS
    from layerfusion.encoders.offline import KNOWN_MODELS
    from layerfusion.fusion.heads import HEADS

    for what, names in (("heads", HEADS), ("datasets", NAMED_DATASETS), ("models", KNOWN_MODELS)):
        with pytest.raises(SystemExit) as exit_:
            main(["list", what])
        assert exit_.value.code == 0
        rows = [r.split()[0] for r in capsys.readouterr().out.splitlines() if not r.startswith("#")]
        assert rows == list(names), what


def test_both_flag_spellings(tmp_path, capsys):
    """`--text_field` reaches classify as `--text-field`: the texts are read from field `body`, and the
    error is about the (missing) model, not about an option or a field."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"body": "fine"}) + "\n")
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "classify",
                str(missing),
                "--file",
                str(texts),
                "--text_field",
                "body",
                "--batch_size=8",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("layerfusion: error: ") and "missing.ckpt" in err, err
    assert dashed_options(["--a_b=c_d", "x_y", "--", "--e_f"]) == [
        "--a-b=c_d",
        "x_y",
        "--",
        "--e_f",
    ]


def test_replacing_one_encoder_field_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/quickstart.yaml", "--model.encoders.name", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model.encoders.name would change only the last encoder" in err[0]
    assert "--model.encoders '[{name: NAME" in err[0]


def test_models_prints_each_model_once():
    """In its own process, as a user runs it (there logging goes to stderr)."""
    name = "sentence-transformers/all-MiniLM-L6-v2"
    out = subprocess.run(
        [sys.executable, "-m", "layerfusion", "models", "--no_pip", name],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    assert sum(name in line for line in lines) == 1, lines
    assert out.stdout.startswith(f"{name}\t")
