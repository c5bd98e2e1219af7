"""Real torchrun runs (gloo on CPU): training, checkpoints, live metrics, resume."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
import urllib.request

import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from trainer_helpers import REPO, free_port, launch_cmd, run_env

pytestmark = pytest.mark.slow

EXPECTED_METRICS = {
    "finetune_epoch", "finetune_epochs_total", "finetune_map50", "finetune_map50_95", "finetune_precision",
    "finetune_recall", "finetune_train_loss", "finetune_images_per_second", "finetune_frozen_parameters",
    "finetune_trainable_parameters", "finetune_cpu_memory_peak_bytes",
}


def train_args(data, out, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "yolov5n", "--epochs", str(epochs), "--batch", "4",
            "--imgsz", "64", "--workers", "0", "--out", str(out), "--hyp", "nbs=4", "--hyp", "warmup_epochs=0",
            "--log-format", "json", *extra]


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_same_run(out, ref) -> None:
    """A resumed run ended where the uninterrupted reference did: per-epoch losses and weights."""
    for a, b in zip(read_rows(out / "results.csv"), read_rows(ref / "results.csv"), strict=True):
        assert float(a["train/box_loss"]) == pytest.approx(float(b["train/box_loss"]), rel=1e-3, abs=1e-5)
    ref_w = torch.load(ref / "last.pt", weights_only=True)["model"]
    res_w = torch.load(out / "last.pt", weights_only=True)["model"]
    for k in ref_w:
        if ref_w[k].is_floating_point():
            torch.testing.assert_close(res_w[k], ref_w[k], rtol=1e-3, atol=1e-4)


def test_torchrun_two_ranks_train_checkpoint_and_serve_metrics(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    proc = subprocess.Popen(launch_cmd(2, *train_args(tiny_dataset, out, 3, "--metrics-port", str(port),
                                                         "--metrics-linger", "3")),
                            cwd=REPO, env=run_env(FINETUNE_NAME="ft-test"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: dict[str, list] = {}
    epochs_seen: set[float] = set()
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        try:
            families = scrape(port)
            epochs_seen.update(sample.value for sample in families.get("finetune_epoch", []))
            if EXPECTED_METRICS <= {n for n, s in families.items() if s}:
                seen = families
        except OSError:
            pass
        time.sleep(0.2)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    missing = EXPECTED_METRICS - set(seen)
    assert not missing, f"metrics never served while running: {missing}\n{output[-2000:]}"
    # labels: finetune from the environment, rank; per-rank memory for both ranks
    for sample in seen["finetune_map50"]:
        assert sample.labels["finetune"] == "ft-test" and sample.labels["rank"] == "0"
    assert {s.labels["rank"] for s in seen["finetune_cpu_memory_peak_bytes"]} == {"0", "1"}
    assert all(s.value > 0 for s in seen["finetune_cpu_memory_peak_bytes"])
    assert {s.labels["component"] for s in seen["finetune_train_loss"]} == {"box", "obj", "cls"}
    assert seen["finetune_epochs_total"][0].value == 3
    # --metrics-linger keeps the endpoint up after the last epoch: the final numbers are seen
    assert 3.0 in epochs_seen, epochs_seen

    for name in ("last.pt", "best.pt", "results.csv", "metrics.json"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["nc"] == 3
    # The model trains channels-last; the checkpoint holds the standard layout (safetensors
    # and other consumers refuse strided tensors).
    for key in ("model", "ema"):
        assert last[key]["model.0.conv.weight"].dim() == 4
        assert all(v.is_contiguous() for v in last[key].values()), key
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 3
    assert summary["trainable_parameters"] > 0
    # one structured JSON line per epoch
    epoch_lines = [json.loads(line) for line in output.splitlines() if line.startswith("{") and '"event": "epoch"' in line]
    assert [e["epoch"] for e in epoch_lines] == [1, 2, 3]


def test_interrupted_torchrun_run_resumes_to_the_same_epoch_count(tiny_dataset, tmp_path):
    epochs = 4
    # An uninterrupted reference run.
    ref = tmp_path / "ref"
    done = subprocess.run(launch_cmd(2, *train_args(tiny_dataset, ref, epochs)), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # The same run killed with SIGKILL once epoch 2's checkpoint exists, then resumed.
    out = tmp_path / "killed"
    proc = subprocess.Popen(launch_cmd(2, *train_args(tiny_dataset, out, epochs)), cwd=REPO, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.csv").is_file() and len(read_rows(out / "results.csv")) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    # Kill the launcher and every worker at once, as a lost node would (torchrun starts
    # its workers in their own sessions, so a process-group kill would miss them).
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    interrupted_epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 2 <= interrupted_epoch < epochs

    # Without --resume the run directory is refused, not overwritten.
    refused = subprocess.run(launch_cmd(1, *train_args(tiny_dataset, out, epochs)), cwd=REPO, env=run_env(),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(launch_cmd(2, *train_args(tiny_dataset, out, epochs, "--resume")), cwd=REPO,
                             env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    messages = [json.loads(line)["msg"] for line in resumed.stderr.splitlines() if line.startswith("{")]
    assert f"resuming from {out / 'last.pt'}: {interrupted_epoch} of {epochs} epochs done" in messages, messages[:3]
    rows = read_rows(out / "results.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == epochs
    # Same seed, same data order, same schedule: the resumed run ends where the reference did.
    assert_same_run(out, ref)


def test_batch_not_divisible_by_world_size_is_a_one_line_error(tiny_dataset, tmp_path):
    args = train_args(tiny_dataset, tmp_path / "run", 1)
    args[args.index("--batch") + 1] = "3"
    done = subprocess.run(launch_cmd(2, *args), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: --batch 3 is not divisible by the world size 2" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_mid_epoch_saves_the_position_and_resume_continues_from_that_batch(tmp_path):
    """What a pod deletion (suspend, preemption, eviction, drain) does to a real torchrun run:
    SIGTERM to the launcher, both ranks stop after the same optimizer step, rank 0 saves the
    position, and --resume trains exactly the rest of that epoch (no batch computed twice)."""
    import re
    import threading

    from finetune.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", classes=["circle", "square"], n_train=48, n_val=8,
                                  imgsz=64, seed=4)
    epochs, batches_per_epoch = 3, 12  # 48 images, batch 4 over 2 ranks: 12 optimizer steps per epoch (nbs=4)
    ref = tmp_path / "ref"
    done = subprocess.run(launch_cmd(2, *train_args(data, ref, epochs)), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "stopped"
    proc = subprocess.Popen(launch_cmd(2, *train_args(data, out, epochs, "--progress", "true")), cwd=REPO,
                            env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    in_epoch_2 = threading.Event()

    def read_progress() -> None:  # tqdm's "epoch 2/3: ... 4/12 [" on stderr
        buffer = ""
        for chunk in iter(lambda: proc.stderr.read(256), ""):
            buffer = (buffer + chunk)[-4000:]
            seen.append(chunk)
            if any(int(m.group(1)) >= 3 for m in re.finditer(r"epoch 2/\d+:[^\r\n]*?\| (\d+)/\d+ \[", buffer)):
                in_epoch_2.set()

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    assert in_epoch_2.wait(timeout=600), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGTERM)  # as the kubelet signals the container's first process
    assert proc.wait(timeout=120) == 143, "".join(seen)[-3000:]
    reader.join(timeout=10)
    stderr = "".join(seen)
    last = torch.load(out / "last.pt", weights_only=True)
    record = last["interrupted"]
    assert last["epoch"] == 1 and record["epoch"] == 1 and record["world_size"] == 2
    stopped_at = {r["progress"]["batches_done"] for r in record["ranks"]}
    assert len(stopped_at) == 1, "the ranks stopped at different steps"
    batches_done = stopped_at.pop()
    assert 3 <= batches_done < batches_per_epoch, batches_done
    assert f"stopped by SIGTERM after batch {batches_done} of epoch 2" in stderr

    resumed = subprocess.run(launch_cmd(2, *train_args(data, out, epochs, "--resume")), cwd=REPO, env=run_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    messages = [json.loads(line)["msg"] for line in resumed.stderr.splitlines() if line.startswith("{")]
    assert f"resuming epoch 2 after batch {batches_done}, where SIGTERM stopped it" in messages, messages[:5]
    rows = read_rows(out / "results.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    # Work lost to the stop: batches computed twice / batches per epoch. The resumed attempt
    # starts right after the saved batch, so none are; the epoch's losses, averaged over both
    # attempts, and the final weights match the uninterrupted run.
    assert_same_run(out, ref)
