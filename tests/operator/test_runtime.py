"""runtime's memory of the operator's own writes: what it plans from before kopf's watch has
caught up, and which events it need not reconcile."""

from __future__ import annotations

from finetune_operator import runtime

KEY = ("ml", "ft")


def finetune(version: str, phase: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTune",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "u1", "resourceVersion": version},
            "spec": {}, "status": {"phase": phase}}


def pod(name: str, version: str) -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": version},
            "spec": {}, "status": {"phase": "Pending"}}


def test_a_written_copy_is_planned_from_until_the_watch_delivers_its_version():
    latest = runtime.LatestCopies()
    indexed = runtime.finetune_entry(finetune("5", "Pending"))
    assert latest.newest(KEY, indexed) is indexed
    latest.wrote(KEY, finetune("7", "Running"))
    latest.seen(KEY, "6")  # an older version reaches the index: ours is still newer
    assert latest.newest(KEY, runtime.finetune_entry(finetune("6", "Pending")))["status"]["phase"] == "Running"
    latest.seen(KEY, "7")
    caught_up = runtime.finetune_entry(finetune("7", "Running"))
    assert latest.newest(KEY, caught_up) is caught_up
    # The event of the operator's own last write needs no reconcile; any other version does.
    assert latest.is_last_known(KEY, "7") and not latest.is_last_known(KEY, "8")
    latest.forget(KEY)
    assert not latest.is_last_known(KEY, "7")


def test_a_created_pod_counts_until_seen_and_its_first_event_is_known():
    pods = runtime.RecentPods()
    pods.created(KEY, pod("ft-worker-0", "11"))
    assert [p["metadata"]["name"] for p in pods.with_indexed(KEY, [])] == ["ft-worker-0"]
    pods.seen(KEY, "ft-worker-0")
    assert pods.with_indexed(KEY, []) == []  # from now on the index alone says whether it exists
    assert pods.is_as_created(KEY, "ft-worker-0", "11")
    assert not pods.is_as_created(KEY, "ft-worker-0", "11")  # asked once: later events reconcile
    pods.created(KEY, pod("ft-worker-1", "12"))
    assert not pods.is_as_created(KEY, "ft-worker-1", "13")  # changed since (e.g. scheduled)
