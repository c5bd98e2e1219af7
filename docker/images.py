#!/usr/bin/env python3
"""Build the two images from docker/*.Dockerfile on a machine with no Docker engine, check
them from the inside, and run containers from them with runc.

    python docker/images.py build            # base stand-in, wheelhouse, both images, checks
    python docker/images.py build trainer    # one image (and what it needs)
    python docker/images.py build --no-check # build only (make test: tests/images checks them)
    python docker/images.py check            # the checks only (images must exist)
    python docker/images.py ref trainer      # print the cached image's tag (build if missing)

Root only: buildah (chroot isolation, overlay storage) and runc from Debian packages,
installed on first use. Everything lives outside the repository, under
``$FINETUNE_IMAGES_CACHE`` (default /var/cache/finetune-images), keyed by a hash of its
inputs, so an unchanged tree costs no rebuild:

* ``localhost/finetune-python-base:3.11-bookworm-<hash>``: no base image can be pulled
  here, so a stand-in for ``python:3.11-slim-bookworm`` is made by mmdebstrap from Debian's
  python3.11 and passed as the Dockerfiles' ``BASE_IMAGE`` build arg.
* ``wheels-<hash>/``: every wheel both images install, downloaded once by this machine's
  pip (which sees its local wheel directories and configuration; pip inside a build does
  not). The build mounts it read-only at /wheels and installs with ``--no-index`` through
  the ``WHEELS`` build arg, so a build never downloads torch's CUDA wheels.
* ``localhost/finetune-{operator,trainer}:<hash>``: hash of the Dockerfile, the build
  context's files (what ``COPY`` reads), the base image id and the wheelhouse key.

This file is also imported (by path) by tests/images and tests/cluster/node_agent.py for
:func:`image_ref`, :func:`rootfs` and :func:`oci_spec`/:func:`runc_run`.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FINETUNE_IMAGES_CACHE", "/var/cache/finetune-images"))
STORAGE = CACHE / "storage"
# buildah's and runc's run-time state (locks, mount bookkeeping): tmpfs, gone at reboot.
RUNROOT = Path("/run/finetune-images")
RUNC_ROOT = Path("/run/finetune-runc")
VENV = REPO / ".venv"

IMAGES = {
    "operator": {"dockerfile": REPO / "docker" / "operator.Dockerfile", "extra": "operator"},
    "trainer": {"dockerfile": REPO / "docker" / "trainer.Dockerfile", "extra": "trainer"},
}
# Stated budgets (bytes of the uncompressed layers). Measured on the stand-in base (~180 MB,
# Debian's python3.11): the operator adds a ~190 MB venv (the Kubernetes client alone is
# ~126 MB with its bytecode); the trainer is dominated by torch's CUDA wheels (~5.3 GB
# installed). An overrun fails `make images`: a second CUDA copy, a build tool or a dependency
# that crept in.
BUDGETS = {"operator": 400 * 10**6, "trainer": 6500 * 10**6}
KEEP_IMAGES = 3  # per name, the one just built included

# The stand-in for python:3.11-slim-bookworm: what the Dockerfiles use from it (python,
# python -m venv, groupadd/useradd) plus what the official image ships for TLS and /etc/services.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ["python3.11", "python-is-python3", "python3-venv", "ca-certificates", "netbase", "tzdata"]
BASE_MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
HOST_PACKAGES = ["buildah", "runc", "mmdebstrap", "golang-github-containers-common"]


class ImageError(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def ensure_host_packages() -> None:
    missing = [p for p in HOST_PACKAGES
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ImageError(f"need root to install Debian packages: {' '.join(missing)}")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def buildah(*args: str, check: bool = True, capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    command = ["buildah", "--root", str(STORAGE), "--runroot", str(RUNROOT), "--storage-driver", "overlay", *args]
    completed = subprocess.run(command, text=True, capture_output=capture, **kwargs)
    if check and completed.returncode != 0:
        tail = (completed.stderr or "")[-4000:] if capture else ""
        raise ImageError(f"{' '.join(command[7:9])} failed (exit {completed.returncode}): {tail}")
    return completed


def image_id(ref: str) -> str | None:
    completed = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, check=False)
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def image_size(ref: str) -> int:
    """Bytes of the image's layers as stored (buildah writes them uncompressed): what a node unpacks."""
    manifest = json.loads(json.loads(buildah("inspect", "--type", "image", ref).stdout)["Manifest"])
    return sum(layer["size"] for layer in manifest["layers"])


def image_config(ref: str) -> dict:
    """The OCI image config (User, Env, Entrypoint, Cmd, WorkingDir)."""
    out = buildah("inspect", "--type", "image", ref).stdout
    return json.loads(out)["OCIv1"]["config"]


class _Lock:
    """flock on a file in the cache: concurrent `make images` / tests build each thing once."""

    def __init__(self, name: str):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.path = CACHE / f".{name}.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# --- the stand-in base image ---------------------------------------------------------------

def base_ref() -> str:
    key = _digest(BASE_SUITE, *BASE_PACKAGES, *BASE_MIRRORS, "minbase-v1")
    return f"localhost/finetune-python-base:3.11-{BASE_SUITE}-{key}"


def build_base() -> str:
    ref = base_ref()
    if image_id(ref):
        return ref
    with _Lock("base"):
        if image_id(ref):
            return ref
        started = time.monotonic()
        say(f"building the stand-in base image {ref} with mmdebstrap (about 6 minutes)")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            subprocess.run([
                "mmdebstrap", "--variant=minbase", "--quiet",
                f"--include={','.join(BASE_PACKAGES)}",
                # What python:*-slim leaves out too: docs, man pages, locales.
                "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
                BASE_SUITE, str(tarball), *BASE_MIRRORS,
            ], check=True)
            container = buildah("from", "--pull=never", "scratch").stdout.strip()
            try:
                buildah("add", container, str(tarball), "/")
                buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--env", "LANG=C.UTF-8", "--cmd", "python3",
                        "--label", f"org.opencontainers.image.description=stand-in for python:3.11-slim-{BASE_SUITE}"
                                   " from Debian packages", container)
                buildah("commit", "--rm", container, ref)
            except BaseException:
                buildah("rm", container, check=False)
                raise
        say(f"base image built in {time.monotonic() - started:.0f}s")
    return ref


# --- the wheelhouse ----------------------------------------------------------------------

def _requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"])
    for name in ("operator", "trainer"):
        reqs += project["project"]["optional-dependencies"][name]
    # The project's own build backend, for pip's isolated build of the project inside the image.
    reqs += project["build-system"]["requires"]
    return reqs


def wheelhouse() -> Path:
    reqs = _requirements()
    directory = CACHE / f"wheels-{_digest(*reqs)}"
    if (directory / ".complete").exists():
        return directory
    with _Lock("wheels"):
        if (directory / ".complete").exists():
            return directory
        pip = VENV / "bin" / "pip"
        if not pip.exists():
            raise ImageError(f"{pip} missing: run `make setup` first")
        started = time.monotonic()
        say(f"collecting {len(reqs)} requirements and their dependencies into {directory} (this machine's pip)")
        partial = directory.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log = CACHE / "wheels.log"
        with log.open("w") as out:  # pip warns about every local index it looks in: keep that out of sight
            completed = subprocess.run([str(pip), "download", "--only-binary=:all:", "-d", str(partial), *reqs],
                                       stdout=out, stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            raise ImageError(f"pip download failed (exit {completed.returncode}); {log}: "
                             + log.read_text()[-3000:])
        (partial / ".complete").touch()
        partial.rename(directory)
        say(f"wheelhouse collected in {time.monotonic() - started:.0f}s")
    return directory


# --- the images ----------------------------------------------------------------------------

def _context_files() -> list[Path]:
    """What the Dockerfiles COPY (the .dockerignore'd context is the same files)."""
    files = [REPO / "pyproject.toml"]
    for root in ("trainer", "operator"):
        for path in sorted((REPO / root).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path) \
                    and path.suffix != ".pyc" and path.name != "runs" and "runs" not in path.relative_to(REPO).parts:
                files.append(path)
    return files


def image_ref(name: str) -> str:
    """The tag the current tree's image has (built or not)."""
    spec = IMAGES[name]
    parts: list[str | bytes] = [name, spec["dockerfile"].read_bytes(), base_ref(), wheelhouse().name]
    for path in _context_files():
        parts += [str(path.relative_to(REPO)), path.read_bytes()]
    return f"localhost/finetune-{name}:{_digest(*parts)}"


def build(name: str) -> str:
    ensure_host_packages()
    base = build_base()
    wheels = wheelhouse()
    ref = image_ref(name)
    if image_id(ref):
        say(f"{name}: cached {ref}")
        return ref
    with _Lock(f"image-{name}"):
        if image_id(ref):
            return ref
        started = time.monotonic()
        say(f"{name}: building {ref} from {IMAGES[name]['dockerfile'].relative_to(REPO)}")
        buildah("bud", "--isolation", "chroot", "--pull=never", "--layers=false",
                "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "WHEELS=/wheels",
                "--volume", f"{wheels}:/wheels:ro",
                "-f", str(IMAGES[name]["dockerfile"]), "-t", ref, "-t", f"localhost/finetune-{name}:latest",
                str(REPO), capture=False)
        say(f"{name}: built in {time.monotonic() - started:.0f}s")
        # Older trees' images are multi-GB: keep the newest KEEP_IMAGES per name. Not just
        # one: another checkout on this machine (CI beside a developer) may be running its own.
        olds = [image for image in json.loads(buildah("images", "--json").stdout or "[]")
                if image.get("names") and all(n.startswith(f"localhost/finetune-{name}:") and n != ref
                                              and not n.endswith(":latest") for n in image["names"])]
        olds.sort(key=lambda image: image.get("created", 0), reverse=True)
        for old in olds[KEEP_IMAGES - 1:]:
            buildah("rmi", "--force", old["id"], check=False)
    return ref


# --- root filesystems and runc ---------------------------------------------------------------

def rootfs(ref: str) -> Path:
    """The image's root filesystem, unpacked once per image id: a buildah working container
    that stays mounted (its overlay upper layer takes runc's mount points; containers run
    with a read-only root on top of it)."""
    iid = image_id(ref)
    if not iid:
        raise ImageError(f"image {ref} is not in the local store ({STORAGE}): ErrImageNeverPull")
    container = f"finetune-rootfs-{iid[:16]}"
    with _Lock("rootfs"):
        exists = buildah("inspect", "--type", "container", container, check=False).returncode == 0
        if not exists:
            buildah("from", "--pull=never", "--name", container, iid)
        return Path(buildah("mount", container).stdout.strip())


DEFAULT_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755",
                                                                            "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    # torch's DataLoader workers and gloo share tensors through /dev/shm: a pod's default is 64 MiB.
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev",
                                                                             "mode=1777", "size=1g"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
]
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# What a container runtime grants by default (Docker/containerd's list); a pod's
# securityContext.capabilities adds to or drops from it.
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]
SECCOMP_PROFILE = Path("/usr/share/containers/seccomp.json")


def runtime_default_seccomp(caps: list[str]) -> dict:
    """Debian's containers-common profile (Docker's format: includes/excludes by capability
    and architecture) turned into an OCI ``linux.seccomp`` for x86_64, as a runtime does."""
    profile = json.loads(SECCOMP_PROFILE.read_text())
    arches = []
    for entry in profile.get("archMap", []):
        if entry["architecture"] == "SCMP_ARCH_X86_64":
            arches = [entry["architecture"], *entry.get("subArchitectures", [])]
    syscalls = []
    for rule in profile["syscalls"]:
        inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
        if inc.get("arches") and "amd64" not in inc["arches"] and "x86_64" not in inc["arches"]:
            continue
        if exc.get("arches") and ("amd64" in exc["arches"] or "x86_64" in exc["arches"]):
            continue
        if inc.get("caps") and not set(inc["caps"]) <= set(caps):
            continue
        if exc.get("caps") and set(exc["caps"]) & set(caps):
            continue
        entry = {"names": rule["names"], "action": rule["action"]}
        if rule.get("args"):
            entry["args"] = rule["args"]
        if rule.get("errnoRet") is not None:
            entry["errnoRet"] = rule["errnoRet"]
        syscalls.append(entry)
    seccomp = {"defaultAction": profile["defaultAction"], "architectures": arches, "syscalls": syscalls}
    if profile.get("defaultErrnoRet") is not None:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return seccomp


def oci_spec(root: Path, args: list[str], *, uid: int, gid: int, env: list[str], cwd: str = "/",
             readonly_root: bool = True, binds: list[tuple[str, str, bool]] = (), tmpfs: list[str] = ("/tmp",),
             caps: list[str] | None = None, no_new_privileges: bool = True, seccomp: bool = True,
             netns: str | None = None, namespaces: dict[str, str] | None = None, supplementary_gids=(),
             hostname: str = "container") -> dict:
    """An OCI runtime spec: ``binds`` are (host, container, read_only); ``caps=None`` is the
    runtime's default set, ``[]`` drops all; ``netns`` a /run/netns path (None: host network);
    ``namespaces`` other namespace paths to join (e.g. {"ipc": ...})."""
    caps = list(DEFAULT_CAPS if caps is None else caps)
    mounts = copy.deepcopy(DEFAULT_MOUNTS)
    for target in tmpfs:
        mounts.append({"destination": target, "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777"]})
    for source, target, read_only in binds:
        mounts.append({"destination": target, "type": "bind", "source": source,
                       "options": ["rbind", "ro" if read_only else "rw", "nosuid", "nodev"]})
    spaces = [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
    if netns:
        spaces.append({"type": "network", "path": netns})
    for kind, path in (namespaces or {}).items():
        spaces = [s for s in spaces if s["type"] != kind] + [{"type": kind, "path": path}]
    linux = {"namespaces": spaces, "maskedPaths": MASKED, "readonlyPaths": READONLY,
             "resources": {"devices": [{"allow": False, "access": "rwm"}]}}
    if seccomp:
        linux["seccomp"] = runtime_default_seccomp(caps)
    return {
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": False, "user": {"uid": uid, "gid": gid, "additionalGids": list(supplementary_gids)},
                    "args": args, "env": env, "cwd": cwd,
                    # No rlimits: the container inherits the runtime's, as under containerd
                    # (raising RLIMIT_NOFILE above this host's hard limit fails the start).
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": no_new_privileges},
        "root": {"path": str(root), "readonly": readonly_root},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }


def image_env(ref: str, extra: dict[str, str] | None = None) -> list[str]:
    env = dict(item.split("=", 1) for item in image_config(ref).get("Env") or [])
    env.update(extra or {})
    return [f"{k}={v}" for k, v in env.items()]


def runc_command(spec: dict, bundle: Path, container_id: str | None = None) -> list[str]:
    """Write ``spec`` as bundle/config.json; return the ``runc run`` command (foreground)."""
    bundle.mkdir(parents=True, exist_ok=True)
    if not any(m["destination"] == "/etc/hosts" for m in spec["mounts"]):
        # As every runtime does: the container's hostname resolves. Without it torchrun's
        # rendezvous retries forever in a network namespace with only loopback.
        hosts = bundle / "hosts"
        hosts.write_text(f"127.0.0.1\tlocalhost {spec['hostname']}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        hosts.chmod(0o644)
        spec = {**spec, "mounts": [*spec["mounts"], {"destination": "/etc/hosts", "type": "bind",
                                                      "source": str(hosts), "options": ["rbind", "ro"]}]}
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    container_id = container_id or f"finetune-{uuid.uuid4().hex[:12]}"
    return ["runc", "--root", str(RUNC_ROOT), "run", "--bundle", str(bundle), container_id]


def runc_run(spec: dict, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="finetune-bundle-") as bundle:
        return subprocess.run(runc_command(spec, Path(bundle)), text=True, capture_output=True,
                              timeout=timeout, **kwargs)


class NetNS:
    """A network namespace with only loopback up: 'no network' for a container."""

    def __init__(self):
        self.name = f"finetune-{uuid.uuid4().hex[:10]}"
        self.path = f"/run/netns/{self.name}"

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


# --- checks inside the built images -----------------------------------------------------------

def _site_packages(root: Path) -> Path:
    found = sorted((root / "opt" / "venv" / "lib").glob("python3*/site-packages"))
    if not found:
        raise ImageError(f"no /opt/venv/lib/python3*/site-packages in {root}")
    return found[0]


def run_entrypoint(ref: str, args: list[str], timeout: float = 120, **spec_kwargs) -> subprocess.CompletedProcess:
    """Run the image's ENTRYPOINT (or ``args`` as the whole command when spec_kwargs has
    ``replace=True``) as the image's USER, read-only root, no network, all caps dropped."""
    config = image_config(ref)
    user = config.get("User") or "0"
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ImageError(f"{ref}: USER {user!r} is not numeric")
    replace = spec_kwargs.pop("replace", False)
    command = args if replace else [*(config.get("Entrypoint") or []), *args]
    spec = oci_spec(rootfs(ref), command, uid=int(uid), gid=int(gid or uid), env=image_env(ref),
                    cwd=config.get("WorkingDir") or "/", caps=[], **spec_kwargs)
    with NetNS() as netns:
        spec["linux"]["namespaces"].append({"type": "network", "path": netns.path})
        return runc_run(spec, timeout=timeout)


def check(name: str, ref: str) -> list[str]:
    """Problems found inside the image (empty: all good). Prints what was measured."""
    problems: list[str] = []
    root = rootfs(ref)
    site = _site_packages(root)
    size = image_size(ref)
    budget = BUDGETS[name]
    say(f"{name}: {ref} size {size / 1e6:.0f} MB (budget {budget / 1e6:.0f} MB)")
    if size > budget:
        problems.append(f"{name}: {size / 1e6:.0f} MB exceeds its {budget / 1e6:.0f} MB budget")
    cudart = [p for p in root.rglob("libcudart.so*") if p.is_file() and not p.is_symlink()]
    configs = sorted((site / "finetune" / "models" / "configs").glob("*.yaml"))
    say(f"{name}: libcudart copies {[str(p.relative_to(root)) for p in cudart]}, {len(configs)} model YAMLs")
    if not configs:
        problems.append(f"{name}: no finetune/models/configs/*.yaml (package data not installed)")
    if name == "trainer":
        if len(cudart) != 1:
            problems.append(f"trainer: {len(cudart)} copies of libcudart, want exactly 1")
        if (site / "kopf").exists() or (site / "kubernetes").exists():
            problems.append("trainer: kopf/kubernetes installed")
        if not (site / "torch").is_dir():
            problems.append("trainer: torch missing")
        checks = [(["--help"], "usage"),
                  (["finetune", "--help"], "usage"),
                  (["python", "-c", "import torch, torchvision, cv2, pycocotools, finetune.models;"
                                    "import os; print('uid', os.getuid(), torch.__version__)"], "uid 1000")]
    else:
        if cudart:
            problems.append("operator: carries libcudart")
        if (site / "torch").exists():
            problems.append("operator: torch installed")
        if not (site / "kopf").is_dir():
            problems.append("operator: kopf missing")
        checks = [(["--help"], "usage"),
                  (["python", "-c", "import kopf, finetune_operator.main, os; print('uid', os.getuid())"],
                   "uid 10001")]
    for args, expect in checks:
        completed = run_entrypoint(ref, args, replace=args[0] != "--help")
        output = completed.stdout + completed.stderr
        shown = " ".join(args)
        if completed.returncode != 0 or expect not in output:
            problems.append(f"{name}: `{shown}` as the image's user: exit {completed.returncode}: {output[-1500:]}")
        else:
            say(f"{name}: `{shown}` ok as USER {image_config(ref).get('User')}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "check", "ref", "base"])
    parser.add_argument("names", nargs="*", choices=[[], *IMAGES], default=[])
    parser.add_argument("--no-check", action="store_true",
                        help="build only (make test: tests/images/test_images.py::test_image_checks checks)")
    options = parser.parse_args(argv)
    names = options.names or list(IMAGES)
    started = time.monotonic()
    try:
        if options.command == "base":
            ensure_host_packages()
            print(build_base())
            return 0
        refs = {}
        for name in names:
            refs[name] = build(name) if options.command != "check" else image_ref(name)
        if options.command == "ref":
            print("\n".join(refs.values()))
            return 0
        problems = [] if options.no_check else [p for name in names for p in check(name, refs[name])]
    except (ImageError, subprocess.CalledProcessError) as error:
        say(f"FAILED: {error}")
        return 1
    for problem in problems:
        say(f"PROBLEM: {problem}")
    if options.no_check:
        say("built (not checked: --no-check): " + ", ".join(refs.values()))
    elif not problems:
        say("all image checks passed: " + ", ".join(refs.values()))
    # What `make images` (and so `make test`) spent here: CI's added time, cached or not.
    say(f"{options.command} {' '.join(names)}: {time.monotonic() - started:.0f}s in all")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
