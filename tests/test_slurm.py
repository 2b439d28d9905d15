"""scripts/slurm.sbatch: run by bash with a recording `srun`, as SLURM would run it on a fresh clone."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import yaml
from conftest import REPO

SCRIPT = REPO / "scripts" / "slurm.sbatch"

FAKE_SRUN = """#!/bin/bash
# records its arguments, the working directory and the thread count it was started with
printf '%s\\n' "$PWD" "$OMP_NUM_THREADS" "$@" > "$SRUN_RECORD"
"""


def _directives() -> dict[str, str]:
    """`#SBATCH --key=value` lines as {key: value} (flags without a value map to '')."""
    out = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split(None, 1)[1].partition("=")
            out[key] = value
    return out


def _run(tmp_path: Path, *args: str) -> list[str]:
    """The script under bash as sbatch starts it (SLURM_* set, submitted from `tmp_path`'s clone); the
    srun command line it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    record = tmp_path / "srun.txt"
    d = _directives()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SRUN_RECORD": str(record),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": d["--nodes"],
        "SLURM_NTASKS_PER_NODE": d["--ntasks-per-node"],
        "SLURM_CPUS_PER_TASK": d["--cpus-per-task"],
        "SLURM_JOB_ID": "123",
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    cwd, threads, *argv = record.read_text().splitlines()
    assert Path(cwd) == REPO, "srun runs from the submit directory"
    assert threads == d["--cpus-per-task"]
    return argv


def test_sbatch_script_runs_from_a_fresh_clone_and_stops_every_rank_on_a_failure(tmp_path):
    d = _directives()
    # the log file's directory exists before anything runs (sbatch opens it before the script starts)
    log_dir = Path(d["--output"]).parent
    assert log_dir == Path(".") or (REPO / log_dir).is_dir() and _tracked(log_dir), d["--output"]
    # Lightning's SLURMEnvironment requeues on SIGUSR1, which SLURM must send before the time limit
    from lightning.fabric.plugins.environments import SLURMEnvironment

    signame, _, seconds = d["--signal"].partition("@")
    assert getattr(signal, signame) == SLURMEnvironment().requeue_signal == signal.SIGUSR1
    assert int(seconds) >= 60 and "--requeue" in d
    # one task per GPU; the trainer preset agrees with the script
    preset = yaml.safe_load((REPO / "configs" / "trainer" / "slurm.yaml").read_text())
    assert d["--ntasks-per-node"] == d["--gpus-per-node"] == str(preset["devices"])
    assert d["--nodes"] == str(preset["num_nodes"])

    argv = _run(tmp_path, "configs/sst2.yaml", "--trainer.max_epochs", "3")
    assert argv[0] == "--kill-on-bad-exit=1"
    assert f"--cpus-per-task={d['--cpus-per-task']}" in argv[: argv.index("python")]
    cli = argv[argv.index("python") :]
    assert (
        cli[:5] == ["python", "-m", "layerfusion", "fit", "--config"]
        and cli[5] == "configs/sst2.yaml"
    )
    assert _value(cli, "--trainer") == "configs/trainer/slurm.yaml"
    assert _value(cli, "--trainer.num_nodes") == d["--nodes"]
    assert _value(cli, "--trainer.devices") == d["--ntasks-per-node"]
    assert cli[-2:] == ["--trainer.max_epochs", "3"], "extra arguments reach the CLI"
    for path in (cli[5], _value(cli, "--trainer")):
        assert _tracked(Path(path)), f"{path} is not in a fresh clone"


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _tracked(path: Path) -> bool:
    """Whether `path` (a file or directory relative to the repository) is in git, i.e. in a fresh clone."""
    out = subprocess.run(
        ["git", "ls-files", "--", str(path)], cwd=REPO, capture_output=True, text=True
    )
    return bool(out.stdout.strip())
