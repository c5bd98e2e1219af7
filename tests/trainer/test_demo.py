"""`make demo`'s pipeline in a reduced size: three runs, a consistent table, real plots."""

from __future__ import annotations

import json
import re
import sys

import pytest

from trainer_helpers import run

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_writes_a_consistent_comparison(tmp_path):
    out = tmp_path / "demo"
    done = run([sys.executable, "-m", "finetune.demo", "--quick", "--out", str(out), "--workers", "0",
                "--metrics-port", "0"], timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    compare = out / "compare"
    result = json.loads((compare / "comparison.json").read_text())
    runs = result["runs"]
    assert [r["freeze"] for r in runs] == ["0", "backbone", "all-but-detect"]
    assert [r["freeze_depth"] for r in runs] == [0, 10, 24]
    trainable = [r["trainable_parameters"] for r in runs]
    assert trainable[0] > trainable[1] > trainable[2] > 0
    # every run really trained from the pre-trained checkpoint, with measured figures
    for r in runs:
        assert r["epochs"] == 2 and r["images_per_second"] > 0 and r["peak_memory_bytes"] > 0
        assert r["wall_time_s"] > 0 and len(r["map50_95_per_epoch"]) == 2
        assert r["trainable_parameters"] + r["frozen_parameters"] == runs[0]["trainable_parameters"]
    # the table shows the JSON's numbers
    table = (compare / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| freeze")]
    assert len(rows) == 3
    for row, r in zip(rows, runs):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].split()[0] == f"{r['map50']:.3f}"
        assert cells[2].split()[0] == f"{r['map50_95']:.3f}"
        assert cells[5].split()[0] == f"{r['images_per_second']:.1f}"
        assert cells[7] == f"{r['trainable_parameters']:,}"
        assert cells[8] == f"{r['frozen_parameters']:,}"
    assert result["suggested_freeze"] in ("0", "backbone", "all-but-detect")
    assert re.search(r"Suggested `freeze: (0|backbone|all-but-detect)`", table)
    for png in ("map_per_epoch.png", "time_memory.png"):
        data = (compare / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
    assert "live metrics: http://" in done.stdout
    assert (out / "pretrain" / "best.pt").is_file()

    # A second demo reuses the pre-trained checkpoint instead of training it again.
    again = run([sys.executable, "-m", "finetune.demo", "--quick", "--out", str(out), "--workers", "0",
                 "--metrics-port", "0"], timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "reusing the pre-trained checkpoint" in again.stdout
