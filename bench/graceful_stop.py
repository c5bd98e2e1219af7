"""How much of an epoch a stopped run loses: SIGTERM (graceful stop) against SIGKILL.

A real two-rank torchrun run (gloo, CPU) is stopped part-way through epoch 2, then resumed
with --resume. Work lost = batches computed twice / batches per epoch, where

- batches computed by the stopped attempt in epoch 2 = the last batch count its progress bar
  showed (tqdm on stderr, a lower bound: the bar refreshes at most every 0.1 s), and
- the batch the resumed attempt starts from = the position saved in last.pt (the start of the
  epoch when last.pt has no mid-epoch record, as after SIGKILL).

Writes bench/results/graceful-stop.{json,md}. Usage: python bench/graceful_stop.py [--trials 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
N_TRAIN, BATCH = 96, 4  # 2 ranks x 2 images: 24 optimizer steps per epoch (nbs = batch)
BATCHES_PER_EPOCH = N_TRAIN // BATCH


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune.launch", "--standalone", "--nproc-per-node=2", "-m", "finetune.cli",
            "train", "--data", str(data), "--model", "yolov5n", "--epochs", "2", "--batch", str(BATCH),
            "--imgsz", "64", "--workers", "0", "--out", str(out), "--hyp", f"nbs={BATCH}", "--hyp",
            "warmup_epochs=0", "--log-format", "json", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def stop_mid_epoch(data: Path, out: Path, how: str, at_batch: int) -> int:
    """Run until epoch 2 shows ``at_batch`` batches, stop it ``how``; the last batch count seen."""
    proc = subprocess.Popen(train_command(data, out, "--progress", "true"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pattern = re.compile(r"epoch 2/\d+:[^\r\n]*?\| (\d+)/\d+ \[")
    seen = {"last": 0}
    reached = threading.Event()

    def read() -> None:
        buffer = ""
        for chunk in iter(lambda: proc.stderr.read(256), ""):
            buffer = (buffer + chunk)[-4000:]
            counts = [int(m.group(1)) for m in pattern.finditer(buffer)]
            if counts:
                seen["last"] = max(seen["last"], *counts)
                if seen["last"] >= at_batch:
                    reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not reached.wait(timeout=900):
        proc.kill()
        raise SystemExit("the run never reached the batch to stop at")
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)  # as the kubelet signals the container's first process
    else:  # a lost node: the launcher and every worker at once
        tree = psutil.Process(proc.pid)
        for p in [tree, *tree.children(recursive=True)]:
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    return seen["last"]


def trial(data: Path, work: Path, how: str, at_batch: int) -> dict:
    out = work / f"{how.lower()}-{at_batch}"
    computed = stop_mid_epoch(data, out, how, at_batch)
    last = torch.load(out / "last.pt", weights_only=True)
    record = last.get("interrupted")
    resumes_after = record["ranks"][0]["progress"]["batches_done"] if record else 0
    resumed = subprocess.run(train_command(data, out, "--resume"), cwd=REPO, env=env(), capture_output=True,
                             text=True, timeout=900)
    if resumed.returncode != 0:
        raise SystemExit(f"resume failed: {resumed.stderr[-2000:]}")
    repeated = max(computed - resumes_after, 0)
    return {"signal": how, "stopped_at_batch_seen": computed, "resumed_after_batch": resumes_after,
            "batches_computed_twice": repeated, "batches_per_epoch": BATCHES_PER_EPOCH,
            "lost_fraction": repeated / BATCHES_PER_EPOCH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="stops per signal, spread over the epoch")
    args = parser.parse_args()
    from finetune.data.synth import make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_synthetic_dataset(work / "data", classes=["circle", "square"], n_train=N_TRAIN, n_val=8,
                                      imgsz=64, seed=4)
        points = [round(BATCHES_PER_EPOCH * (i + 1) / (args.trials + 1)) for i in range(args.trials)]
        trials = [trial(data, work, how, at) for how in ("SIGTERM", "SIGKILL") for at in points]
    load = os.getloadavg()
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "load_average": [round(x, 2) for x in load], "trials": trials}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "graceful-stop.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Graceful stop ({result['date']}, load average {load[0]:.1f})", "",
             "Two-rank torchrun (gloo, CPU), yolov5n at 64 px, stopped part-way through epoch 2, then "
             "--resume. Lost = batches computed twice / batches per epoch.", "",
             "| signal | batches seen before the stop | resumed after batch | computed twice | lost |",
             "|---|---|---|---|---|"]
    for t in trials:
        lines.append(f"| {t['signal']} | {t['stopped_at_batch_seen']}/{t['batches_per_epoch']} | "
                     f"{t['resumed_after_batch']} | {t['batches_computed_twice']} | {t['lost_fraction']:.0%} |")
    (RESULTS / "graceful-stop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
