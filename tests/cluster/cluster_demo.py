"""`make cluster-demo`: the CPU sample FineTune on a local, real control plane, end to end.

One command: starts the control plane (building the binaries once, reused from the cache
afterwards), the node agent (tests/cluster/node_agent.py: two Nodes whose pods run as local
processes in their own network namespaces), installs the CRD and the chart's RBAC and runs the
operator as the chart's ServiceAccount, makes the synthetic dataset and output PVs, applies
``crds/samples/finetune-cpu-smoke.yaml`` as shipped, and streams ``kubectl get ft -w`` until
it finishes. Prometheus (Debian's, if installed) scrapes the trainers and the operator.
Then it prints where everything is and keeps running until Ctrl-C, which cleans it all up.

    sudo .venv/bin/python tests/cluster/cluster_demo.py [--exit-when-done] [--no-prometheus] [--venv]

The worker pods run from the built trainer image (docker/images.py builds it first, or finds
it cached): the node agent's image mode runs each under runc as the pod's securityContext
says. The sample is applied with ``spec.image`` set to that local image. ``--venv`` runs them
from the checkout's virtualenv instead (no image build).

Needs root (network namespaces), like the node agent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLE = REPO / "crds" / "samples" / "finetune-cpu-smoke.yaml"
NAMESPACE = "default"


sys.path.insert(0, str(REPO / "tests"))
from support import load_module as _load  # noqa: E402


def say(msg: str) -> None:
    print(f"[cluster-demo] {msg}", flush=True)


def install_operator(cp, oh, workdir: Path):
    """CRD + the chart's RBAC (helm_python) + the operator running with the chart's SA token."""
    kubeconfig = oh.install_crd_and_chart_rbac(cp, token_duration="24h")
    operator = oh.Operator(kubeconfig, NAMESPACE, workdir / "operator.log")
    operator.start()
    return operator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exit-when-done", action="store_true", help="clean up and exit when the FineTune finishes")
    ap.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    ap.add_argument("--workdir", help="where the dataset and results go (default: a new temp dir, kept)")
    ap.add_argument("--venv", action="store_true", help="run the pods from .venv instead of the trainer image")
    args = ap.parse_args(argv)

    cpm = _load("finetune_tests_control_plane", HERE / "control_plane.py")
    na = _load("finetune_tests_node_agent", HERE / "node_agent.py")
    oh = _load("finetune_tests_operator_cluster", REPO / "tests" / "operator" / "test_operator_cluster.py")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-cluster-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    cp = agent = operator = prom = sd = None
    watcher = None
    try:
        say("starting the control plane (builds the binaries once, ~5-10 min, then cached) ...")
        trainer_image = None
        if not args.venv:
            images = _load("finetune_tests_images", REPO / "docker" / "images.py")
            say("building the trainer image (or finding it cached by its inputs' hash) ...")
            trainer_image = images.build("trainer")
            say(f"trainer image {trainer_image}")
        cp = cpm.ControlPlane(keep=False)
        cp.start()
        say(f"control plane v{cpm.K8S_VERSION} up in {cp.startup_seconds:.1f}s at {cp.server}")
        agent = na.NodeAgent(cp, [na.NodeSpec("demo-node-0", cpu="4", memory="8Gi"),
                                  na.NodeSpec("demo-node-1", cpu="4", memory="8Gi")],
                             workdir=workdir / "node-agent",  # kept: pod logs
                             image_mode=trainer_image is not None).start()
        say(f"node agent: nodes demo-node-0, demo-node-1; pod network {agent.bridge} {agent.bridge_ip}/16; "
            f"pod logs under {agent.dir}/pods")
        operator = install_operator(cp, oh, workdir)
        say(f"operator running as the chart's ServiceAccount; metrics http://127.0.0.1:{operator.metrics_port}/metrics")
        data, runs = workdir / "data", workdir / "runs"
        subprocess.run([str(REPO / ".venv" / "bin" / "finetune"), "synth", "--out", str(data), "--train", "48",
                        "--val", "16", "--imgsz", "160"], check=True, stdout=subprocess.DEVNULL)
        runs.mkdir(exist_ok=True)
        for d in (data, runs):
            d.chmod(0o755)
        cp.bind_host_path_claim(NAMESPACE, "finetune-synth-data", data)
        cp.bind_host_path_claim(NAMESPACE, "finetune-runs", runs)
        say(f"dataset PV {data}, output PV {runs}")
        if not args.no_prometheus and shutil.which("prometheus"):
            pm = _load("finetune_tests_prometheus", REPO / "tests" / "e2e" / "prometheus.py")
            sd = pm.HttpServiceDiscovery().start()
            sd.follow_control_plane(cp, namespaces=[NAMESPACE])
            sd.set_operator(f"127.0.0.1:{operator.metrics_port}", namespace=oh.OPERATOR_NAMESPACE)
            prom = pm.PrometheusServer(sd).start()
            say(f"Prometheus UI: {prom.url}  (try: finetune_map50, finetune_operator_finetunes)")
        if trainer_image:
            import yaml
            body = yaml.safe_load(SAMPLE.read_text())
            body["spec"]["image"] = trainer_image
            cp.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=json.dumps(body))
            say(f"applied {SAMPLE.relative_to(REPO)} with spec.image {trainer_image}; kubectl get ft -w:")
        else:
            cp.kubectl("-n", NAMESPACE, "apply", "-f", str(SAMPLE))
            say(f"applied {SAMPLE.relative_to(REPO)}; kubectl get ft -w:")
        watcher = subprocess.Popen(["kubectl", "--kubeconfig", str(cp.kubeconfig), "-n", NAMESPACE,
                                    "get", "ft", "-w"])
        phase = ""
        while phase not in ("Succeeded", "Failed"):
            time.sleep(1)
            ft = json.loads(cp.kubectl("-n", NAMESPACE, "get", "ft", "cpu-smoke", "-o", "json").stdout)
            phase = (ft.get("status") or {}).get("phase", "")
        time.sleep(1.5)
        watcher.terminate()
        watcher.wait()
        status = ft["status"]
        say(f"FineTune cpu-smoke {phase}: {status.get('message', '')}")
        say(f"results: {runs / 'cpu-smoke'} ({', '.join(sorted(p.name for p in (runs / 'cpu-smoke').glob('*')))})")
        for pod in ("cpu-smoke-worker-0", "cpu-smoke-worker-1"):
            got = json.loads(cp.kubectl("-n", NAMESPACE, "get", "pod", pod, "-o", "json").stdout)
            state = got["status"]["containerStatuses"][0]
            say(f"{pod}: image {state['image']} ({state.get('imageID') or 'no image: venv'}), "
                f"container {state.get('containerID', '')}")
        say(f"worker logs: {agent.log_path(NAMESPACE, 'cpu-smoke-worker-0')}, "
            f"{agent.log_path(NAMESPACE, 'cpu-smoke-worker-1')}")
        say(f"operator log: {operator.log_path}")
        if prom:
            say(f"Prometheus UI: {prom.url}")
        say(f"export KUBECONFIG={cp.kubeconfig}")
        if args.exit_when_done:
            return 0 if phase == "Succeeded" else 1
        say("Ctrl-C stops everything and cleans up.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        say("cleaning up ...")
        if watcher and watcher.poll() is None:
            watcher.terminate()
        if operator:
            operator.stop()
        if prom:
            prom.stop()
        if sd:
            sd.stop()
        if agent:
            agent.stop()
        if cp:
            cp.stop()
        say(f"done (dataset and results kept in {workdir})")


if __name__ == "__main__":
    sys.exit(main())
