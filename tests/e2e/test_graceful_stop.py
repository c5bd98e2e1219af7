"""Graceful stop through the operator and the node agent (issue 15, part 3), on real torchrun.

A FineTune runs on two pods (the trainer image under runc, one rank each, gloo over the pod
network). Part-way through epoch 2 it is suspended (``spec.suspend: true``): the operator
deletes the workers, the node agent SIGTERMs each container's ``finetune-launch`` (torchrun)
and would SIGKILL after the pod's ``terminationGracePeriodSeconds`` (the spec's default 60 s:
the agent's short default cap is raised for this test), the ranks agree on stopping at an
optimizer-step boundary and rank 0 writes a mid-epoch last.pt. Then ``spec.suspend: false``
brings new pods whose ``--resume=auto`` continues from that batch, and the run succeeds.

Work lost is measured as bench/graceful_stop.py measures it: batches computed twice / batches
per epoch, where the batches the stopped attempt computed in the epoch are what each rank
reported when it stopped ("stopped by SIGTERM after batch N of epoch 2": a rank stops right
after that optimizer step; the tqdm bar the benchmark reads is off in a pod, whose stderr is
no terminal), and the batch the resumed attempt starts after is what it logged ("resuming
epoch 2 after batch N"; the start of the epoch when it logged no such line). The resumed
run's per-epoch losses and final weights must match an uninterrupted run on the same data and
seed within the tolerance of the trainer's resume tests (``assert_same_run``); the
uninterrupted run is bare torchrun with the very flags the operator gives the pods (another
run in the cluster would add a minute and show nothing more), started while the resumed pods
start up.

Small and fast (2 cores in CI): 128 synthetic 64 px images, yolov5n, 2 epochs of 32 optimizer
steps (global batch 4), ``OMP_NUM_THREADS=1`` in the pods as in the bare run.

The second test checks the agent's part on its own: SIGKILL comes min(the pod's grace, the
agent's cap) after SIGTERM, and ``raised_grace_cap`` lets a pod use a longer grace period.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from support import load_module
from test_end_to_end import CLASSES, E2E, VENV_BIN, run

from finetune_operator import manifests

oh = sys.modules["finetune_tests_operator_cluster"]
REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "trainer") not in sys.path:
    sys.path.append(str(REPO / "tests" / "trainer"))
# The trainer's own resume test: its tolerance (assert_same_run) and its torchrun command line.
trainer_tests = load_module("finetune_tests_train_distributed", REPO / "tests" / "trainer" / "test_train_distributed.py")
from trainer_helpers import launch_cmd, run_env  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N_TRAIN, N_VAL, IMGSZ, BATCH, EPOCHS = 128, 8, 64, 4, 2
BATCHES_PER_EPOCH = N_TRAIN // BATCH  # 2 ranks x 2 images per optimizer step (nbs = batch)
GRACE = 60  # spec.pod.terminationGracePeriodSeconds' default, honoured by the agent here
NAME = "graceful"


@pytest.fixture(scope="module")
def gs(control_plane, node_agent, trainer_image, operator_kubeconfig, tmp_path_factory):
    """A namespace served by the e2e node agent, the operator (chart RBAC, the trainer image as
    its default), a synthetic dataset on a PV and an output PV: test_end_to_end's set-up without
    its Prometheus and pre-training, which this test does not need."""
    cp = control_plane
    namespace = f"gs-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", namespace)
    node_agent.serve(namespace)
    root = tmp_path_factory.mktemp("graceful")
    operator = oh.Operator(operator_kubeconfig, namespace, root / "operator.log",
                           env={"FINETUNE_TRAINER_IMAGE": trainer_image})
    env = E2E(cp, node_agent, None, namespace, root, operator)
    run([str(VENV_BIN / "finetune"), "synth", "--out", str(env.data), "--classes", CLASSES, "--train",
         str(N_TRAIN), "--val", str(N_VAL), "--imgsz", str(IMGSZ), "--seed", "4"])
    env.out.mkdir()
    for d in (env.data, env.out):
        d.chmod(0o755)
    cp.bind_host_path_claim(namespace, "finetune-synth-data", env.data)
    cp.bind_host_path_claim(namespace, "finetune-runs", env.out)
    operator.start()
    yield env
    operator.stop()
    print(f"--- operator log ({operator.log_path}) ---\n{operator.log_tail(60)}")
    cp.kubectl("-n", namespace, "delete", "ft", "--all", "--wait=false", check=False)
    cp.kubectl("-n", namespace, "delete", "pods", "--all", "--grace-period=0", "--force", "--wait=false", check=False)
    cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def json_lines(log: str) -> list[dict]:
    records = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def json_messages(log: str) -> list[str]:
    return [r["msg"] for r in json_lines(log) if "msg" in r]


def stopped_after(log: str, epoch: int) -> list[int]:
    """The batches a rank reported when SIGTERM stopped it (its Interrupted line)."""
    return [int(n) for n in re.findall(rf"stopped by SIGTERM after batch (\d+) of epoch {epoch}\b", log)]


def reference_run(body: dict, data_yaml: Path, out: Path, log: Path) -> subprocess.Popen:
    """Bare torchrun (2 ranks, one machine) with the flags the operator gives the pods."""
    config = dataclasses.replace(manifests.train_config(NAME, body["spec"]), data=data_yaml, out=out, resume=None,
                                 metrics_port=None, metrics_linger=0.0)
    with open(log, "w") as f:
        return subprocess.Popen(launch_cmd(2, "train", *config.to_argv()), cwd=REPO, env=run_env(),
                                stdout=f, stderr=subprocess.STDOUT)


def test_suspend_mid_epoch_checkpoints_on_sigterm_and_resume_loses_under_10_percent(gs):
    body = gs.sample(NAME, training={"epochs": EPOCHS, "batchSize": BATCH, "imageSize": IMGSZ, "seed": 0,
                                     "hyperparameters": {"nbs": BATCH, "warmup_epochs": 0}},
                     pod={"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]})
    assert body["spec"]["backoffLimit"] == 0  # a stop counted as a failure would fail the run
    out = gs.out / NAME
    with gs.agent.raised_grace_cap(2 * GRACE):
        gs.apply(body)
        oh.wait_for(lambda: len(gs.agent_leftovers(NAME)) == 2, "both workers' processes", timeout=120)
        runs = [gs.agent.pod_run(gs.ns, f"{NAME}-worker-{i}") for i in range(2)]
        assert all(runs), runs
        # Epoch 2 starts when epoch 1's row is written; suspend about a third into it (the stop
        # itself lands a second or so later: the operator's watch, the deletion, the agent's poll).
        oh.wait_for(lambda: len(gs.results(NAME)) >= 1, "epoch 1's results row", timeout=300, interval=0.1)
        seen_row = time.monotonic()
        epoch_1_s = float(gs.results(NAME)[0]["train_time_s"])
        time.sleep(max(0.0, 0.3 * epoch_1_s - (time.monotonic() - seen_row)))
        assert len(gs.results(NAME)) == 1, "epoch 2 ended before the suspend"
        suspended_at = time.time()
        gs.cp.kubectl("-n", gs.ns, "patch", "ft", NAME, "--type=merge", "-p", '{"spec":{"suspend":true}}')
        gs.wait_phase(NAME, ("Suspended",), timeout=30)
        oh.wait_for(lambda: not gs.cluster.pods(NAME), "the stopped pods to go", timeout=GRACE + 30)
        oh.wait_for(lambda: all(r.exited_at is not None for r in runs), "the agent to see both exits", timeout=10)

    # ---- the stop: SIGTERM, not SIGKILL, well within the pod's grace period
    logs = [r.log.read_text(errors="replace") for r in runs]
    for r, log in zip(runs, logs):
        assert r.sigterm_at is not None and r.grace == GRACE, (r.name, r.sigterm_at, r.grace)
        took = r.exited_at - r.sigterm_at
        assert took < GRACE, f"{r.name} needed {took:.1f}s after SIGTERM (grace {GRACE}s):\n{log[-3000:]}"
        assert r.proc.returncode == 143, (r.name, r.proc.returncode, log[-3000:])
    stop_seconds = max(r.exited_at - r.sigterm_at for r in runs)
    # every rank stopped after the same optimizer step, part-way through epoch 2
    reported = [stopped_after(log, 2) for log in logs]
    assert all(len(n) == 1 for n in reported), (reported, [log[-2000:] for log in logs])
    stopped_at = {n[0] for n in reported}
    assert len(stopped_at) == 1, f"the ranks stopped at different steps: {reported}"
    batches_done = stopped_at.pop()
    assert 0 < batches_done < BATCHES_PER_EPOCH, batches_done
    # rank 0 wrote last.pt with that position for every rank, within the grace period
    saved = [r["time"] for r in json_lines(logs[0])
             if r.get("msg") == f"SIGTERM: saved last.pt after batch {batches_done} of epoch 2"]
    assert len(saved) == 1, logs[0][-3000:]
    save_seconds = saved[0] - suspended_at  # from the suspend request, so SIGTERM -> save is less
    assert 0 < save_seconds < GRACE, save_seconds
    last = torch.load(out / "last.pt", weights_only=True)
    record = last["interrupted"]
    assert last["epoch"] == 1 and record["epoch"] == 1 and record["world_size"] == 2
    assert [rank["progress"]["batches_done"] for rank in record["ranks"]] == [batches_done] * 2
    for key in ("model", "optimizer", "scheduler", "ema"):
        assert last.get(key), key
    status = gs.cluster.status(NAME)
    assert status["phase"] == "Suspended" and status.get("restarts", 0) == 0, status

    # ---- the uninterrupted reference (bare torchrun) while the resumed pods start
    reference_log = gs.root / "reference.log"
    reference = reference_run(body, gs.data / "data.yaml", gs.root / "reference", reference_log)
    gs.cp.kubectl("-n", gs.ns, "patch", "ft", NAME, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = gs.wait_phase(NAME, ("Succeeded", "Failed"), timeout=400)
    assert status["phase"] == "Succeeded", status
    assert status.get("restarts", 0) == 0, status  # a suspension is no failed attempt
    resumed_log = gs.agent.log(gs.ns, f"{NAME}-worker-0")
    resumed = json_messages(resumed_log)
    match = [int(m.group(1)) for msg in resumed if (m := re.match(r"resuming epoch 2 after batch (\d+),", msg))]
    resumed_after = match[0] if match else 0  # no such line: the epoch started over
    computed_twice = max(batches_done - resumed_after, 0)
    lost = computed_twice / BATCHES_PER_EPOCH
    print(f"graceful stop through the operator and the node agent: stopped after batch {batches_done}/"
          f"{BATCHES_PER_EPOCH} of epoch 2, last.pt saved {save_seconds:.1f}s after the suspend request, pods "
          f"ended {stop_seconds:.1f}s after their SIGTERM; resumed after batch "
          f"{resumed_after}: {computed_twice} batches computed twice, lost {lost:.1%} of an epoch")
    assert lost < 0.10, (lost, resumed[:6])
    assert resumed_after == batches_done, resumed[:6]
    rows = gs.results(NAME)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1)), rows
    assert status["epoch"] == EPOCHS and status["progress"] == f"{EPOCHS}/{EPOCHS}", status
    assert abs(status["metrics"]["map50"] - float(rows[-1]["metrics/mAP_0.5"])) < 1e-4, (status, rows[-1])

    # ---- the resumed run ends where the uninterrupted one does
    try:
        reference.wait(timeout=600)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, reference_log.read_text()[-3000:]
    trainer_tests.assert_same_run(out, gs.root / "reference")


def test_the_agent_gives_a_deleted_pod_its_grace_period_up_to_the_cap(gs, trainer_image):
    """What the test above relies on: SIGKILL comes min(the pod's grace, the agent's cap) after
    SIGTERM, and raised_grace_cap lets a pod use a grace period longer than the default cap."""
    cap = gs.agent.grace_cap
    linger = int(cap) + 5  # how long each pod's SIGTERM trap takes: longer than the default cap

    def pod(name: str, grace: int) -> dict:
        script = f"trap 'echo got-TERM; sleep {linger}; echo done; exit 0' TERM; echo started; " \
                 "while true; do sleep 0.2; done"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace,
                         "containers": [{"name": "main", "image": trainer_image, "command": ["sh", "-c", script]}]}}

    names = {"capped": 30, "honoured": 30, "short": 2}
    gs.cp.apply([pod(name, grace) for name, grace in names.items()], namespace=gs.ns)
    runs = {name: oh.wait_for(lambda n=name: (r := gs.agent.pod_run(gs.ns, n)) and "started" in
                              gs.agent.log(gs.ns, n) and r, f"pod {name} to start", timeout=120)
            for name in names}
    gs.cp.kubectl("-n", gs.ns, "delete", "pod", "capped", "--wait=false")
    oh.wait_for(lambda: runs["capped"].sigterm_at is not None, "capped's SIGTERM", timeout=10)
    with gs.agent.raised_grace_cap(60):
        gs.cp.kubectl("-n", gs.ns, "delete", "pod", "honoured", "short", "--wait=false")
        oh.wait_for(lambda: all(runs[n].sigterm_at is not None for n in ("honoured", "short")), "their SIGTERM",
                    timeout=10)
    assert gs.agent.grace_cap == cap
    oh.wait_for(lambda: all(r.exited_at is not None for r in runs.values()), "the pods to end", timeout=linger + 20)
    took = {name: r.exited_at - r.sigterm_at for name, r in runs.items()}
    logs = {name: r.log.read_text(errors="replace") for name, r in runs.items()}
    assert all("got-TERM" in log for log in logs.values()), logs
    # the default cap cut the 30 s grace short; raised, the pod had the time its trap needed
    assert runs["capped"].grace == cap and cap - 0.5 <= took["capped"] < linger, (took, logs["capped"])
    assert "done" not in logs["capped"] and runs["capped"].proc.returncode != 0
    assert runs["honoured"].grace == 30 and took["honoured"] >= linger - 0.5, took
    assert "done" in logs["honoured"] and runs["honoured"].proc.returncode == 0, logs["honoured"]
    # under the raised cap, a pod's own shorter grace period still holds
    assert runs["short"].grace == 2 and took["short"] < cap - 1, took
    assert "done" not in logs["short"] and runs["short"].proc.returncode != 0
