"""Shared pytest fixtures.

Cluster fixtures (see tests/cluster/README.md):

* ``control_plane`` (session): a started :class:`ControlPlane` - real etcd,
  kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 on loopback.
  Builds the binaries first when they are not cached (tests/cluster/build-control-plane.sh,
  ~10 minutes once per machine). Never skips: no control plane is a test error.
* ``kubectl`` (function): ``kubectl(*args, input=None, check=True) -> CompletedProcess``
  bound to the admin kubeconfig.
* ``namespace`` (function): a fresh namespace name; after the test its pods are
  force-deleted (no kubelet) and the namespace is deleted without waiting.
* ``kubeconfig`` (session): path of the admin kubeconfig.

Any test using them is marked ``cluster`` automatically.

Image fixtures (docker/images.py, ``make images``):

* ``trainer_image``/``operator_image`` (session): the tag of the image built from this
  checkout (``localhost/finetune-<name>:<input hash>``). Built, or found in the cache by
  its input hash, once, after collection, when a selected test uses the fixture: a first
  build takes minutes and must not count against a test's pytest-timeout. A failed build
  makes those tests error with the build's output; they are never skipped. ``make test``
  builds both first (``make images``), so pytest only finds them.
* ``images`` (session): docker/images.py itself (image_config, rootfs, oci_spec, check ...).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

_CLUSTER_DIR = Path(__file__).resolve().parent / "cluster"
_CLUSTER_FIXTURES = {"control_plane", "kubectl", "namespace", "kubeconfig"}
_IMAGES_PY = Path(__file__).resolve().parents[1] / "docker" / "images.py"
_IMAGE_FIXTURES = {"trainer_image": "trainer", "operator_image": "operator"}
_IMAGE_REFS: dict[str, str] = {}
_IMAGE_ERRORS: dict[str, str] = {}


def _load_control_plane_module():
    # Loaded by path under a fixed name, independent of rootdir/sys.path/import mode.
    name = "finetune_tests_control_plane"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _CLUSTER_DIR / "control_plane.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cp_module = _load_control_plane_module()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


_BUILD_ERROR: str | None = None


def load_images_module():
    """docker/images.py, loaded by path under a fixed name (docker/ is no package)."""
    name = "finetune_tests_images"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _IMAGES_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_collection_finish(session):
    """Build what the selected tests need once, before the first test: the control plane's
    binaries, then the images (see the module docstring).

    Done here rather than in the fixtures so that a first build (minutes) is not counted
    against a test's pytest-timeout. A failure is reported by the fixture, as a test error.
    """
    _build_control_plane(session)
    _build_images(session)


def _build_images(session):
    wanted = sorted({image for item in session.items for fixture, image in _IMAGE_FIXTURES.items()
                     if fixture in getattr(item, "fixturenames", ())})
    if not wanted:
        return
    images = load_images_module()
    for name in wanted:
        try:
            _IMAGE_REFS[name] = images.build(name)
        except Exception as error:  # reported by the fixture, as a test error
            _IMAGE_ERRORS[name] = f"building the {name} image failed: {error}"


def _image(name: str) -> str:
    if name in _IMAGE_ERRORS:
        pytest.fail(_IMAGE_ERRORS[name], pytrace=False)
    return _IMAGE_REFS[name]


@pytest.fixture(scope="session")
def images():
    return load_images_module()


@pytest.fixture(scope="session")
def trainer_image() -> str:
    return _image("trainer")


@pytest.fixture(scope="session")
def operator_image() -> str:
    return _image("operator")


def _build_control_plane(session):
    global _BUILD_ERROR
    if not any(_CLUSTER_FIXTURES.intersection(getattr(i, "fixturenames", ())) for i in session.items):
        return
    bin_dir = cp_module.default_bin_dir()
    if all((bin_dir / c).is_file() for c in cp_module.COMPONENTS):
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    say = (lambda line: tr.write_line(line)) if tr else (lambda line: print(line, file=sys.stderr))
    say(f"building the Kubernetes control plane into {bin_dir} (once per machine) ...")
    proc = subprocess.Popen(["bash", str(cp_module.BUILD_SCRIPT)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        say(line.rstrip())
    if proc.wait() != 0:
        _BUILD_ERROR = (f"{cp_module.BUILD_SCRIPT} failed (exit {proc.returncode}):\n"
                        + "\n".join(lines[-50:]))


@pytest.fixture(scope="session")
def control_plane():
    """A running control plane for the whole session (fails loudly, never skips)."""
    if _BUILD_ERROR:
        pytest.fail(_BUILD_ERROR, pytrace=False)
    cp = cp_module.ControlPlane()
    try:
        cp.start()
    except Exception as e:  # readable error instead of a long traceback into helpers
        pytest.fail(f"could not start the Kubernetes control plane: {e}", pytrace=False)
    print(f"\n[control_plane] v{cp_module.K8S_VERSION} up in {cp.startup_seconds:.1f}s "
          f"at {cp.server} (dir {cp.dir})", file=sys.stderr)
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture
def kubectl(control_plane):
    """kubectl(*args, input=None, check=True) -> subprocess.CompletedProcess (admin)."""
    return control_plane.kubectl


@pytest.fixture
def namespace(control_plane, request):
    """A unique, freshly created namespace; deleted (without waiting) after the test."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    if os.environ.get("FINETUNE_K8S_KEEP_NAMESPACES") != "1":
        # No kubelet: bound pods would keep the namespace Terminating forever.
        control_plane.kubectl("-n", name, "delete", "pods", "--all", "--grace-period=0", "--force",
                              "--wait=false", check=False)
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
