"""`gather_rows` on a real 2-process Gloo group with uneven row counts (one rank may have none)."""

from __future__ import annotations

import json

from conftest import gloo_ranks

RANK = """
import json, sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from layerfusion.callbacks.tracking import gather_rows

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def all_gather(t):  # what LightningModule.all_gather returns for a tensor: [world, *t.shape]
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


module = SimpleNamespace(
    trainer=SimpleNamespace(world_size=world, strategy=SimpleNamespace(root_device=torch.device("cpu"))),
    all_gather=all_gather,
)
results = {}
for counts in json.loads(sys.argv[1]):
    rows = torch.arange(counts[rank] * 3, dtype=torch.float32).reshape(-1, 3) + 100 * (rank + 1)
    results[str(counts)] = gather_rows(module, rows).tolist()
print(json.dumps(results))
dist.destroy_process_group()
"""


def test_gather_rows_with_uneven_ranks(tmp_path):
    cases = [[3, 1], [0, 2], [2, 0], [2, 2]]
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    outs = gloo_ranks(script, json.dumps(cases), timeout=240)
    for counts in cases:  # every rank's rows, in rank order, without the padding, on both ranks
        expected = [
            [100.0 * (r + 1) + 3 * i + j for j in range(3)]
            for r in range(2)
            for i in range(counts[r])
        ]
        for out in outs:
            assert json.loads(out)[str(counts)] == expected, counts
