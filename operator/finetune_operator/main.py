"""Entry point: ``finetune-operator`` (or ``python -m finetune_operator.main``) runs kopf.

    finetune-operator [--all-namespaces | --namespace NS ...] [--standalone] [--peering NAME]
                      [--liveness URL] [--metrics-port PORT] [--verbose | --debug]

All kopf settings live in the one startup handler below. Environment variables give the
defaults so that the chart (and tests) can tune the operator without changing its args.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, ClassVar, Mapping, Sequence

import kopf
import prometheus_client

from . import handlers  # (registers the handlers)
from . import kube as kube_
from . import manifests
from . import manifests as m
from . import metrics as metrics_
from . import runtime
from . import validation

PEERING_NAME = "finetune-operator"
FINALIZER = "finetune.dev/finalizer"
PREFIX = "finetune.dev"
LIST_PAGE_SIZE = 200
OWNED_SELECTOR = ",".join(f"{k}={v}" if isinstance(v, str) else k for k, v in handlers.OWNED_LABELS.items())


@dataclasses.dataclass
class Options:
    """The operator's settings: built once in ``main`` (or the startup handler, under
    ``kopf run``) from the environment and the command line, then handed to every handler
    through kopf's memo. Nothing reads the environment elsewhere."""

    metrics_port: int = 8080
    metrics_address: str = "0.0.0.0"
    server_timeout: int = 300
    posting_level: str = "INFO"
    # Threads that reconcile (runtime.WorkQueue; kopf's handlers are async and only enqueue).
    # A new FineTune's reconcile is four requests in a row, each mostly a wait on the
    # apiserver: 16 threads kept a burst's p99 within the minimal kopf operator's where 8 were
    # 1.2-1.7 times it (bench/results/README.md, 2026-12-07).
    max_workers: int = 16
    scrape_timeout: float = 2.0
    # Threads that scrape rank 0 (apart from kopf's handler threads).
    scrape_workers: int = 4
    # How often a Running FineTune (or one waiting to retry a refused pod) is looked at.
    poll_interval: float = 10.0
    # How long after an API error a reconcile is tried again.
    retry_delay: float = 5.0
    # How long a pod event waits for its siblings' events before its FineTune is reconciled.
    pod_event_delay: float = 0.5
    # The trainer image for FineTunes without spec.image (the chart sets FINETUNE_TRAINER_IMAGE).
    trainer_image: str = m.DEFAULT_TRAINER_IMAGE
    # Comma-separated volume source types a FineTune may use; empty: validation's default.
    allowed_volume_types: str = ""
    # "true": one NetworkPolicy per FineTune; the JSON list of peers that may reach port 9400.
    network_policy: str = ""
    network_policy_metrics_from: str = "[]"
    # Comma-separated references a FineTune's spec.pod may make (manifests.POD_REFERENCES).
    allowed_pod_references: str = ""
    # Gang scheduling by PodGroups: the schedulerName of each enabled scheduler; empty: not enabled.
    coscheduling_scheduler: str = ""
    volcano_scheduler: str = ""
    # "true": a FineTune may ask for a PodDisruptionBudget (spec.podDisruptionBudget).
    pod_disruption_budgets: str = ""

    ENVIRONMENT: ClassVar[dict[str, str]] = {
        "metrics_port": "FINETUNE_OPERATOR_METRICS_PORT",
        "metrics_address": "FINETUNE_OPERATOR_METRICS_ADDRESS",
        "server_timeout": "FINETUNE_OPERATOR_WATCH_SERVER_TIMEOUT",
        "posting_level": "FINETUNE_OPERATOR_EVENT_LEVEL",
        "max_workers": "FINETUNE_OPERATOR_MAX_WORKERS",
        "scrape_timeout": "FINETUNE_OPERATOR_SCRAPE_TIMEOUT",
        "scrape_workers": "FINETUNE_OPERATOR_SCRAPE_WORKERS",
        "poll_interval": "FINETUNE_OPERATOR_RECONCILE_INTERVAL",
        "retry_delay": "FINETUNE_OPERATOR_RETRY_DELAY",
        "pod_event_delay": "FINETUNE_OPERATOR_POD_EVENT_DELAY",
        "trainer_image": m.TRAINER_IMAGE_ENV,
        "allowed_volume_types": "FINETUNE_OPERATOR_ALLOWED_VOLUME_TYPES",
        "network_policy": "FINETUNE_OPERATOR_NETWORK_POLICY",
        "network_policy_metrics_from": "FINETUNE_OPERATOR_NETWORK_POLICY_METRICS_FROM",
        "allowed_pod_references": "FINETUNE_OPERATOR_ALLOWED_POD_REFERENCES",
        "coscheduling_scheduler": "FINETUNE_OPERATOR_COSCHEDULING_SCHEDULER",
        "volcano_scheduler": "FINETUNE_OPERATOR_VOLCANO_SCHEDULER",
        "pod_disruption_budgets": "FINETUNE_OPERATOR_POD_DISRUPTION_BUDGETS",
    }

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> "Options":
        """Defaults, overridden by the environment variables in ENVIRONMENT that are set and not empty."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        casts = {"int": int, "float": float, "str": str}
        return cls(**{field: casts[types[field]](environ[var])
                      for field, var in cls.ENVIRONMENT.items() if environ.get(var)})


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base. kopf builds one from every watch event (a deep copy of the whole body,
    managedFields and all) for change-detecting handlers (on.create/update/field), which this
    operator does not have: it has only event and index handlers. In a burst of new FineTunes
    that copying was a fifth of kopf's event loop, which every pod event goes through."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.startup()
def configure_operator(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    options: Options = memo.get("options") or Options.from_environment(os.environ)
    # Everything the operator writes to a FineTune is under its own prefix, not kopf.zalando.org.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    # The server ends each watch after server_timeout; the client gives up a little later so a
    # silently dropped connection is noticed.
    settings.watching.server_timeout = options.server_timeout
    settings.watching.client_timeout = options.server_timeout + 30
    settings.watching.connect_timeout = 30
    # The first listing in pages: one page's parsed objects at a time rather than every
    # FineTune's or pod's at once (kopf holds what it listed until all of it is indexed).
    settings.watching.chunk_size = LIST_PAGE_SIZE
    # Only the operator's own pods reach it (filtered by the apiserver, not here).
    settings.watching.label_selectors["", "v1", "pods"] = OWNED_SELECTOR
    settings.posting.level = logging.getLevelName(options.posting_level.upper())
    # A second replica with the same peering name stays on standby (if the peering CRD exists;
    # --peering makes it mandatory, --standalone turns it off).
    if settings.peering.name == "default":
        settings.peering.name = PEERING_NAME
    if options.metrics_port:
        prometheus_client.start_http_server(options.metrics_port, addr=options.metrics_address)
        logger.info("serving operator metrics on %s:%d", options.metrics_address, options.metrics_port)
    try:
        allowed_volume_types = validation.parse_allowed_volume_types(options.allowed_volume_types)
        metrics_from = (manifests.parse_network_policy_peers(options.network_policy_metrics_from)
                        if options.network_policy.lower() == "true" else None)
        platform = platform_settings(options)
    except ValueError as e:
        raise kopf.PermanentError(f"invalid operator setting: {e}") from e
    memo.runtime = runtime.Runtime(
        kube=kube_.Kube(),
        metrics=metrics_.OperatorMetrics(),
        options=options,
        scrapes=runtime.ScrapePool(options.scrape_workers, options.scrape_timeout),
        allowed_volume_types=allowed_volume_types,
        network_policy_metrics_from=metrics_from,
        settings=platform,
    )


def platform_settings(options: Options) -> manifests.PlatformSettings:
    """What the chart allows FineTunes to ask of their pods; ValueError for a setting it never writes."""
    schedulers = {policy: name for policy, name in ((m.GANG_COSCHEDULING, options.coscheduling_scheduler),
                                                    (m.GANG_VOLCANO, options.volcano_scheduler)) if name}
    return manifests.PlatformSettings(
        allowed_pod_references=validation.parse_allowed_pod_references(options.allowed_pod_references),
        scheduler_names=schedulers,
        pod_disruption_budgets=options.pod_disruption_budgets.lower() == "true",
    )


@kopf.on.cleanup()
def stop_scraping(memo: kopf.Memo, **_: Any) -> None:
    if "runtime" in memo:
        memo.runtime.queue.shutdown()
        memo.runtime.free_memory.cancel()
        memo.runtime.scrapes.shutdown()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__.split("\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch only this namespace (repeatable; kopf patterns allowed)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", help="no peering (e.g. no kopf.dev CRDs installed)")
    peering.add_argument("--peering", metavar="NAME", help="mandatory peering under NAME")
    parser.add_argument("--priority", type=int, help="peering priority (the highest runs, others stand by)")
    parser.add_argument("--liveness", default=os.environ.get("FINETUNE_OPERATOR_LIVENESS", "http://0.0.0.0:8081/healthz"),
                        help="kopf liveness endpoint URL; empty disables it")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="port of the operator's Prometheus metrics; 0 disables them")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    options = Options.from_environment(os.environ)
    if args.metrics_port is not None:
        options.metrics_port = args.metrics_port
    kopf.configure(verbose=args.verbose, debug=args.debug)
    if not (args.verbose or args.debug):
        # kopf logs "Handler ... succeeded." at INFO for every handler call, i.e. for every
        # watch event of every FineTune and pod: a tenth of its event loop in a burst.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(options=options),
    )


if __name__ == "__main__":
    main()
