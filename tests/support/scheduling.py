"""The scheduling reference CRDs (scheduler-plugins' and Volcano's PodGroups) as the tests apply them.

They are unmodified copies of ``shared/scheduling/``'s, kept in ``tests/data/scheduling/`` (see its
README.md) so that a clean clone has them (CI's has no ``shared/`` beside it); a missing copy is
a test error, never a skip."""

from __future__ import annotations

from pathlib import Path

from . import REPO, wait_for

SCHEDULING_REFERENCE = REPO / "tests" / "data" / "scheduling"
POD_GROUP_CRDS = {
    "podgroups.scheduling.x-k8s.io": SCHEDULING_REFERENCE / "scheduler-plugins_scheduling.x-k8s.io_podgroups.yaml",
    "podgroups.scheduling.volcano.sh": SCHEDULING_REFERENCE / "volcano_scheduling.volcano.sh_podgroups.yaml",
}


def install_pod_group_crds(cp) -> dict[str, Path]:
    """Apply both PodGroup CRDs as they are and wait until the apiserver serves them."""
    missing = [str(path) for path in POD_GROUP_CRDS.values() if not path.is_file()]
    assert not missing, f"the scheduling reference CRDs are missing: {missing} (tests/data/scheduling)"
    for path in POD_GROUP_CRDS.values():
        cp.kubectl("apply", "-f", str(path))
    for name in POD_GROUP_CRDS:
        wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                             for c in cp.get_json("crd", name).get("status", {}).get("conditions") or []),
                 f"the {name} CRD to be established", timeout=60)
    return POD_GROUP_CRDS
