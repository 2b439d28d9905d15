"""Commands that do not train do not pay for Lightning (~12 s to import): the readers and `report`."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import sys
import layerfusion.data
import layerfusion.data.readers
from layerfusion.__main__ import main

sys.argv = ["layerfusion", "report", sys.argv[1], "--out", sys.argv[2]]
try:
    main()
except SystemExit as done:
    assert done.code in (0, None), done.code
loaded = sorted(m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning")))
print("LIGHTNING:", loaded[:5])
"""


def test_readers_and_report_do_not_import_lightning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps({"dataset": "sst2", "head": "gated", "encoders": ["m"]})
    )
    (run / "metrics_test.json").write_text(json.dumps({"test_acc": 0.9, "test_f1": 0.89}))
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(run), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LIGHTNING: []" in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "results.csv").is_file()
