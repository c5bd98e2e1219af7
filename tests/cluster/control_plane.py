"""A real, throw-away Kubernetes control plane for tests.

Runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler (v1.20.2, built
from Debian's source package by ``build-control-plane.sh``) as local subprocesses on
random loopback ports. There is no kubelet: tests register Nodes with
:meth:`ControlPlane.register_node` (the scheduler binds pods to them) and play the
kubelet's part with :meth:`ControlPlane.set_pod_status`.

Interactive use (prints the KUBECONFIG path, runs until Ctrl-C)::

    .venv/bin/python tests/cluster/control_plane.py up [--node NAME] ...

Only the standard library is needed here; ``kubectl`` (the host's) does the API calls.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

# The test-infra modules are loaded by path; their shared teardown registry is one module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import teardown  # noqa: E402

K8S_VERSION = "1.20.2"
HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-control-plane.sh"
CACHE_ROOT = Path(os.environ.get("FINETUNE_K8S_CACHE", "/var/cache/finetune-k8s"))
KUBECTL = os.environ.get("FINETUNE_KUBECTL") or shutil.which("kubectl") or "/usr/bin/kubectl"

ADMIN_USER = "finetune-admin"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ControlPlaneError(RuntimeError):
    pass


def default_bin_dir() -> Path:
    return Path(os.environ.get("FINETUNE_K8S_BIN", CACHE_ROOT / f"v{K8S_VERSION}" / "bin"))


def ensure_built(bin_dir: Path | None = None) -> Path:
    """Return the directory with the binaries, running the build script when needed."""
    bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
    if all((bin_dir / c).is_file() for c in COMPONENTS):
        return bin_dir
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}); see its output above")
    built = Path(proc.stdout.strip().splitlines()[-1])
    if "FINETUNE_K8S_BIN" not in os.environ:
        bin_dir = built
    missing = [c for c in COMPONENTS if not (bin_dir / c).is_file()]
    if missing:
        raise ControlPlaneError(f"build finished but {missing} missing in {bin_dir}")
    return bin_dir


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_dirs(base: Path) -> None:
    """Remove work dirs whose owning process died without cleaning up (e.g. SIGKILL).

    Their components died with it (PR_SET_PDEATHSIG). Dirs kept on purpose
    (FINETUNE_K8S_KEEP=1 / keep=True) hold a `keep` file and are left alone.
    """
    for d in base.glob("finetune-k8s-*"):
        try:
            if (d / "keep").exists() or time.time() - d.stat().st_mtime < 60:
                continue
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback.

    >>> with ControlPlane() as cp:
    ...     cp.kubectl("get", "ns")
    """

    def __init__(self, bin_dir: str | Path | None = None, workdir: str | Path | None = None,
                 keep: bool | None = None, build: bool = True, start_timeout: float = 60.0,
                 audit_groups: tuple[str, ...] = ()):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self._workdir_arg = workdir
        self.keep = bool(int(os.environ.get("FINETUNE_K8S_KEEP", "0"))) if keep is None else keep
        self.build = build
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.server = ""
        self.kubeconfig: Path | None = None
        self.admin_token = ""
        self.ca_file: Path | None = None
        self.startup_seconds: float | None = None
        self.timings: dict[str, float] = {}  # start-up phases, seconds since start()
        self._lock = threading.RLock()
        self._logs: dict[str, object] = {}
        self._n_kubeconfigs = 0
        self._stopped = True
        # Requests by users in these groups go to the apiserver's audit log (Metadata level).
        self.audit_groups = tuple(audit_groups)
        self.audit_log: Path | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        if not self._stopped:
            return self
        t0 = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = ensure_built() if self.build else default_bin_dir()
        for c in COMPONENTS:
            if not (self.bin_dir / c).is_file():
                raise ControlPlaneError(f"{self.bin_dir / c} missing: run {BUILD_SCRIPT}")
        if not (os.path.isfile(KUBECTL) and os.access(KUBECTL, os.X_OK)):
            raise ControlPlaneError(f"kubectl not found ({KUBECTL!r}); set FINETUNE_KUBECTL")
        self.procs, self._logs, self.timings = {}, {}, {}
        if self._workdir_arg:
            self.dir = Path(self._workdir_arg)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            # tmpfs when there is one: etcd fsyncs on every write.
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            _sweep_stale_dirs(Path(base or tempfile.gettempdir()))
            self.dir = Path(tempfile.mkdtemp(prefix="finetune-k8s-", dir=base))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        self._stopped = False
        teardown.track(self)
        try:
            self._t0 = t0
            self._write_credentials()
            self.timings["credentials"] = time.monotonic() - t0
            self._start_all()
        except BaseException:
            self.stop(keep_dir=True)
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, keep_dir: bool | None = None) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        # reverse start order; each component runs in its own process group
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for name, p in self.procs.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        for f in self._logs.values():
            f.close()
        teardown.untrack(self)
        keep = self.keep if keep_dir is None else (keep_dir or self.keep)
        if self.dir and not keep and not self._workdir_arg:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.dir and self.dir.exists():
            (self.dir / "keep").touch()

    # ------------------------------------------------------------------ set-up
    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr}")

    def _write_credentials(self) -> None:
        d = self.dir
        (d / "pki").mkdir(exist_ok=True)
        # CA, and an apiserver serving certificate signed by it (verifiable TLS on loopback).
        # EC P-256 keys: generated in milliseconds, unlike RSA.
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        self._openssl("req", "-x509", *ec, "-days", "3650",
                      "-subj", "/CN=finetune-test-ca", "-keyout", "pki/ca.key", "-out", "pki/ca.crt",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
        self._openssl("req", *ec, "-subj", "/CN=kube-apiserver",
                      "-keyout", "pki/apiserver.key", "-out", "pki/apiserver.csr")
        (d / "pki/apiserver.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,IP:10.0.0.1\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
        self._openssl("x509", "-req", "-in", "pki/apiserver.csr", "-CA", "pki/ca.crt",
                      "-CAkey", "pki/ca.key", "-CAcreateserial", "-days", "3650",
                      "-extfile", "pki/apiserver.ext", "-out", "pki/apiserver.crt")
        # ServiceAccount token signing key (ES256 tokens)
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "pki/sa.key")
        self._openssl("ec", "-in", "pki/sa.key", "-pubout", "-out", "pki/sa.pub")
        self.ca_file = d / "pki/ca.crt"

        self.admin_token = uuid.uuid4().hex
        self._cm_token = uuid.uuid4().hex
        self._sched_token = uuid.uuid4().hex
        # token,user,uid,"group1,group2"
        (d / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},uid-admin,"system:masters"\n'
            f'{self._cm_token},system:kube-controller-manager,uid-kcm,"system:masters"\n'
            f'{self._sched_token},system:kube-scheduler,uid-sched,"system:masters"\n')
        os.chmod(d / "tokens.csv", 0o600)

    def _kubeconfig_text(self, token: str, user: str) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "finetune-test", "cluster": {
                "server": self.server, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "finetune-test", "user": user}}],
            "current-context": user,
        }, indent=1)

    def _write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        path.write_text(self._kubeconfig_text(token, user))
        os.chmod(path, 0o600)
        return path

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "wb")
        self._logs[name] = log
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.dir, start_new_session=True, preexec_fn=teardown.die_with_parent)

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            text = (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            raise ControlPlaneError(
                f"{name} exited with {p.returncode} during start-up; log {self.dir}/{name}.log:\n"
                + self.log_tail(name))

    def _wait_http(self, name: str, url: str, token: str | None = None, ctx=None,
                   deadline: float = 0.0) -> None:
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(name)
            req = urllib.request.Request(url)
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                    body = r.read().decode(errors="replace")
                    if r.status == 200 and body.strip() == "ok":
                        return
                    last = body
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:2000].decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.1)
        raise ControlPlaneError(f"{name} not ready at {url} after {self.start_timeout}s: {last}\n"
                                f"log {self.dir}/{name}.log:\n{self.log_tail(name)}")

    def _start_all(self) -> None:
        d, b = self.dir, self.bin_dir
        etcd_client, etcd_peer, api, kcm, sched = _free_ports(5)
        self.server = f"https://127.0.0.1:{api}"
        deadline = time.monotonic() + self.start_timeout
        verify = ssl.create_default_context(cafile=str(self.ca_file))
        insecure = ssl._create_unverified_context()

        etcd_url = f"http://127.0.0.1:{etcd_client}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        self._spawn("etcd", [
            str(b / "etcd"), "--name", "default", "--data-dir", str(d / "etcd-data"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}", "--initial-cluster-state", "new",
            "--log-level", "warn", "--logger", "zap", "--quota-backend-bytes", str(2 << 30),
        ])
        self._spawn("kube-apiserver", [
            str(b / "kube-apiserver"),
            "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--secure-port", str(api), "--insecure-port", "0",
            # not a loopback address: Endpoints validation rejects 127.0.0.0/8
            "--advertise-address", "10.0.0.1", "--endpoint-reconciler-type", "none",
            "--service-cluster-ip-range", "10.0.0.0/24",
            "--cert-dir", str(d / "pki"),
            "--tls-cert-file", str(d / "pki/apiserver.crt"),
            "--tls-private-key-file", str(d / "pki/apiserver.key"),
            "--client-ca-file", str(d / "pki/ca.crt"),
            "--token-auth-file", str(d / "tokens.csv"),
            "--authorization-mode", "Node,RBAC",
            "--service-account-key-file", str(d / "pki/sa.pub"),
            "--service-account-signing-key-file", str(d / "pki/sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--api-audiences", "https://kubernetes.default.svc.cluster.local",
            "--disable-admission-plugins", "ServiceAccount",
            "--allow-privileged",
            "--profiling=false",
            "--v", "1",
            *self._audit_args(),
        ])
        self._wait_http("kube-apiserver", f"{self.server}/readyz", token=self.admin_token,
                        ctx=verify, deadline=deadline)
        self.timings["apiserver-ready"] = time.monotonic() - self._t0

        self.kubeconfig = self._write_kubeconfig(d / "admin.kubeconfig", self.admin_token, ADMIN_USER)
        kcm_kc = self._write_kubeconfig(d / "controller-manager.kubeconfig", self._cm_token,
                                        "system:kube-controller-manager")
        sched_kc = self._write_kubeconfig(d / "scheduler.kubeconfig", self._sched_token,
                                          "system:kube-scheduler")
        common = lambda kc, port, name: [  # noqa: E731
            # no --authentication/authorization-kubeconfig: /healthz is always allowed, and
            # without a requestheader CA they only log errors
            "--kubeconfig", str(kc), "--leader-elect=false",
            "--bind-address", "127.0.0.1", "--secure-port", str(port), "--port", "0",
            "--cert-dir", str(d / f"{name}-certs"), "--profiling=false", "--v", "1"]
        self._spawn("kube-controller-manager", [
            str(b / "kube-controller-manager"), *common(kcm_kc, kcm, "kcm"),
            "--controllers", "*,-serviceaccount-token,-nodelifecycle",
            "--use-service-account-credentials=false",
            "--root-ca-file", str(d / "pki/ca.crt"),
            "--service-account-private-key-file", str(d / "pki/sa.key"),
            "--concurrent-gc-syncs", "20",
        ])
        self._spawn("kube-scheduler", [str(b / "kube-scheduler"), *common(sched_kc, sched, "sched")])
        self._wait_http("kube-controller-manager", f"https://127.0.0.1:{kcm}/healthz",
                        ctx=insecure, deadline=deadline)
        self._wait_http("kube-scheduler", f"https://127.0.0.1:{sched}/healthz",
                        ctx=insecure, deadline=deadline)
        self.timings["components-healthy"] = time.monotonic() - self._t0
        # The namespace "default" and its ServiceAccount exist once the controllers run.
        while time.monotonic() < deadline:
            if self.kubectl("-n", "default", "get", "serviceaccount", "default",
                            check=False).returncode == 0:
                break
            time.sleep(0.1)

    def _audit_args(self) -> list[str]:
        if not self.audit_groups:
            return []
        policy = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                  # One event per request, written when the response is complete.
                  "omitStages": ["RequestReceived", "ResponseStarted"],
                  "rules": [{"level": "Metadata", "userGroups": list(self.audit_groups)}, {"level": "None"}]}
        (self.dir / "audit-policy.json").write_text(json.dumps(policy))
        self.audit_log = self.dir / "audit.log"
        return ["--audit-policy-file", str(self.dir / "audit-policy.json"),
                "--audit-log-path", str(self.audit_log), "--audit-log-maxsize", "0"]

    def audit_events(self, user: str | None = None) -> list[dict]:
        """The audit log's events so far (ControlPlane(audit_groups=...)), optionally one user's."""
        if self.audit_log is None:
            raise ControlPlaneError("the audit log is off: pass audit_groups to ControlPlane")
        if not self.audit_log.exists():
            return []
        events = []
        with open(self.audit_log) as f:
            for line in f:
                if line.endswith("\n"):  # a line being written has no newline yet
                    event = json.loads(line)
                    if user is None or event["user"]["username"] == user:
                        events.append(event)
        return events

    # ------------------------------------------------------------------ helpers
    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at the admin kubeconfig."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: str | Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the host's kubectl against this control plane (admin unless `kubeconfig`)."""
        cmd = [KUBECTL, "--kubeconfig", str(kubeconfig or self.kubeconfig), *map(str, args)]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(map(str, args))} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()}\n{proc.stdout.strip()}".rstrip())
        return proc

    def get_json(self, *args: str, namespace: str | None = None) -> dict:
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl(*ns, "get", *args, "-o", "json").stdout)

    def apply(self, manifest: str | dict | list, namespace: str | None = None) -> str:
        """kubectl apply -f - (YAML/JSON text, a dict, or a list of dicts)."""
        if not isinstance(manifest, str):
            items = manifest if isinstance(manifest, list) else [manifest]
            manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        ns = ["-n", namespace] if namespace else []
        return self.kubectl(*ns, "apply", "-f", "-", input=manifest).stdout

    def bind_host_path_claim(self, namespace: str, claim: str, path: Path) -> None:
        """A hostPath PV pre-bound to a PVC (the controller-manager completes the binding)."""
        pv = f"{namespace}-{claim}"
        self.apply([
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
             "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                      "persistentVolumeReclaimPolicy": "Retain",
                      "hostPath": {"path": str(path), "type": "Directory"},
                      "claimRef": {"namespace": namespace, "name": claim}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": claim, "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                      "resources": {"requests": {"storage": "1Gi"}}}},
        ])

    def create_token(self, namespace: str, serviceaccount: str, duration: str = "1h") -> str:
        """A bound ServiceAccount token from the TokenRequest API."""
        return self.kubectl("-n", namespace, "create", "token", serviceaccount,
                            f"--duration={duration}").stdout.strip()

    def kubeconfig_for_token(self, token: str, name: str = "token-user") -> Path:
        """Write a kubeconfig that authenticates with `token`; returns its path."""
        with self._lock:
            self._n_kubeconfigs += 1
            n = self._n_kubeconfigs
        return self._write_kubeconfig(self.dir / f"token-{n}.kubeconfig", token, name)

    def register_node(self, name: str, cpu: str | int = "4", memory: str = "16Gi", gpus: int = 0,
                      labels: dict[str, str] | None = None, taints: list[dict] | None = None,
                      pods: int = 110) -> dict:
        """Create a Ready Node the scheduler can bind pods to (no kubelet behind it)."""
        capacity = {"cpu": str(cpu), "memory": str(memory), "pods": str(pods),
                    "ephemeral-storage": "100Gi"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        now = _now()
        ip = self._fake_ip("node", name)
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", **(labels or {})}},
            "spec": {"taints": taints or []},
        }
        status = {"status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [
                {"type": t, "status": "False", "reason": f"Kubelet{r}", "message": "fake node",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
                for t, r in (("MemoryPressure", "HasSufficientMemory"),
                             ("DiskPressure", "HasNoDiskPressure"),
                             ("PIDPressure", "HasSufficientPID"))
            ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "fake kubelet is posting ready status",
                  "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": ip},
                          {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": f"v{K8S_VERSION}", "kubeProxyVersion": f"v{K8S_VERSION}",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "fake://1.0", "osImage": "fake",
                         "kernelVersion": "fake", "machineID": "", "systemUUID": "", "bootID": ""},
        }}
        self.kubectl("create", "-f", "-", input=json.dumps(node))
        self.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                     "-p", json.dumps(status))
        # The TaintNodesByCondition admission plugin adds not-ready:NoSchedule on create;
        # the node-lifecycle controller (disabled) would lift it: do it here.
        current = self.get_json("node", name)
        kept = [t for t in current["spec"].get("taints") or []
                if not t["key"].startswith("node.kubernetes.io/")]
        self.kubectl("patch", "node", name, "--type=merge",
                     "-p", json.dumps({"spec": {"taints": kept or None}}))
        return self.get_json("node", name)

    def reap_terminating_pods(self, namespace: str | None = None) -> list[str]:
        """Finish graceful deletions like a kubelet: force-delete pods with a deletionTimestamp.

        Without a kubelet, deleting a bound, non-terminal pod (by hand, by the garbage
        collector, by a Job) leaves it Terminating forever. Returns "ns/name" of reaped pods.
        """
        scope = ["-n", namespace] if namespace else ["--all-namespaces"]
        pods = json.loads(self.kubectl("get", "pods", *scope, "-o", "json").stdout)["items"]
        reaped = []
        for p in pods:
            md = p["metadata"]
            if md.get("deletionTimestamp"):
                self.kubectl("-n", md["namespace"], "delete", "pod", md["name"], "--grace-period=0",
                             "--force", "--wait=false", check=False)
                reaped.append(f"{md['namespace']}/{md['name']}")
        return reaped

    @staticmethod
    def _fake_ip(kind: str, name: str) -> str:
        h = hashlib.sha256(f"{kind}/{name}".encode()).digest()
        return f"10.{244 if kind == 'pod' else 250}.{h[0]}.{max(1, h[1] % 254)}"

    def set_pod_status(self, namespace: str, pod: str, phase: str, exit_code: int | None = None,
                       reason: str | None = None, message: str | None = None) -> dict:
        """Patch a pod's status like a kubelet would (Pending/Running/Succeeded/Failed).

        All containers get the same state: waiting (Pending), running (Running) or
        terminated with `exit_code` (Succeeded: 0 by default, Failed: 1 by default).
        Returns the pod after the patch.
        """
        if phase not in ("Pending", "Running", "Succeeded", "Failed", "Unknown"):
            raise ValueError(f"bad phase {phase!r}")
        p = self.get_json("pod", pod, namespace=namespace)
        now = _now()
        started = (p.get("status") or {}).get("startTime") or now
        uid = p["metadata"]["uid"]
        ip = self._fake_ip("pod", f"{namespace}/{pod}/{uid}")
        host_ip = self._fake_ip("node", p["spec"].get("nodeName") or "")

        def cstatus(c: dict, i: int) -> dict:
            cid = "containerd://" + hashlib.sha256(f"{uid}/{c['name']}".encode()).hexdigest()
            s = {"name": c["name"], "image": c.get("image", ""), "imageID": "",
                 "restartCount": 0, "ready": phase == "Running", "started": phase == "Running"}
            if phase == "Pending":
                s["state"] = {"waiting": {"reason": reason or "ContainerCreating"}}
            elif phase == "Running":
                s.update(containerID=cid, state={"running": {"startedAt": started}})
            elif phase in ("Succeeded", "Failed"):
                code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
                term = {"exitCode": int(code), "reason": reason or ("Completed" if code == 0 else "Error"),
                        "startedAt": started, "finishedAt": now, "containerID": cid}
                if message:
                    term["message"] = message
                s.update(containerID=cid, state={"terminated": term})
            else:
                s["state"] = {"waiting": {"reason": reason or "Unknown"}}
            return s

        ready = "True" if phase == "Running" else "False"
        cond = lambda t, st, r=None: {k: v for k, v in {  # noqa: E731
            "type": t, "status": st, "lastProbeTime": None, "lastTransitionTime": now,
            "reason": r}.items() if v is not None or k == "lastProbeTime"}
        not_ready_reason = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
        status = {
            "phase": phase,
            "conditions": [
                cond("Initialized", "True", "PodCompleted" if phase in ("Succeeded", "Failed") else None),
                cond("Ready", ready, None if ready == "True" else not_ready_reason),
                cond("ContainersReady", ready, None if ready == "True" else not_ready_reason),
                cond("PodScheduled", "True" if p["spec"].get("nodeName") else "False"),
            ],
            "startTime": started,
            "containerStatuses": [cstatus(c, i) for i, c in enumerate(p["spec"]["containers"])],
            "reason": reason if phase in ("Failed",) and reason else None,
            "message": message,
        }
        if p["spec"].get("nodeName"):
            status["hostIP"] = host_ip
        if phase in ("Running", "Succeeded", "Failed"):
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        out = self.kubectl("-n", namespace, "patch", "pod", pod, "--subresource=status",
                           "--type=merge", "-p", json.dumps({"status": status}), "-o", "json")
        return json.loads(out.stdout)


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 prog="python tests/cluster/control_plane.py")
    sub = ap.add_subparsers(dest="cmd")
    up = sub.add_parser("up", help="start a control plane and keep it running until Ctrl-C")
    up.add_argument("--node", action="append", default=[], metavar="NAME[:CPU:MEM[:GPUS]]",
                    help="register a fake Ready node (repeatable), e.g. gpu-0:8:32Gi:2")
    up.add_argument("--keep", action="store_true", help="keep the work dir (logs) after exit")
    up.add_argument("--kubeconfig-out", help="also copy the admin kubeconfig here")
    sub.add_parser("build", help="build (or find) the binaries and print their directory")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(ensure_built())
        return 0
    if args.cmd != "up":
        ap.print_help()
        return 2
    cp = ControlPlane(keep=args.keep)
    cp.start()
    for spec in args.node:
        name, *rest = spec.split(":")
        cpu, mem, gpus = (rest + ["4", "16Gi", "0"][len(rest):])[:3]
        cp.register_node(name, cpu=cpu, memory=mem, gpus=int(gpus))
    if args.kubeconfig_out:
        shutil.copy(cp.kubeconfig, args.kubeconfig_out)
    print(f"control plane v{K8S_VERSION} up in {cp.startup_seconds:.1f}s at {cp.server}", flush=True)
    print(f"logs: {cp.dir}", flush=True)
    print(f"export KUBECONFIG={args.kubeconfig_out or cp.kubeconfig}", flush=True)
    print("Ctrl-C to stop.", flush=True)
    try:
        while all(p.poll() is None for p in cp.procs.values()):
            time.sleep(1)
        dead = [n for n, p in cp.procs.items() if p.poll() is not None]
        print(f"component(s) exited: {dead}\n" + "\n".join(cp.log_tail(n) for n in dead), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
