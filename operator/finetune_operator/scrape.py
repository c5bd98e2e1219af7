"""Reads rank 0's Prometheus endpoint (docs/trainer-contract.md) into status-shaped numbers.

Scraping is best effort: a trainer that is still starting, or a network policy in the way,
only means the status shows older numbers.

The endpoint belongs to whoever wrote the FineTune (they choose the trainer image), so it is
read as hostile: at most ``MAX_SCRAPE_BYTES``, one overall deadline for the whole request (not
per read: a server dripping a byte a second would otherwise hold a thread forever), no
redirects (a 3xx is a failed scrape, never a request to another address), and values that
are not finite or outside their range are dropped with a warning before they reach the status.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import socket
import time
import urllib.parse
from typing import Any, Mapping

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

MAX_SCRAPE_BYTES = 1 << 20  # the trainer's exposition is a few KiB
_MAX_HEADER_BYTES = 16 << 10
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})[^\r\n]*\r?\n")

# Sample name -> status.metrics field. Per-run gauges are read from rank 0's series.
_RUN_GAUGES = {
    "finetune_epoch": "epoch",
    "finetune_epochs_total": "epochs",
    "finetune_map50": "map50",
    "finetune_map50_95": "map50_95",
    "finetune_precision": "precision",
    "finetune_recall": "recall",
    "finetune_images_per_second": "imagesPerSecond",
    "finetune_feature_cache_bytes": "featureCacheBytes",
    "finetune_feature_cache_build_seconds": "featureCacheBuildSeconds",
    "finetune_feature_cache_views": "featureCacheViews",
    "finetune_freeze_depth": "freezeDepth",
    "finetune_freeze_memory_budget_bytes": "freezeBudgetBytes",
}
# --freeze auto: one series per probed depth (label ``depth``) -> status.freeze.probes.
_FREEZE_PROBE = "finetune_freeze_probe_peak_bytes"
MAX_FREEZE_PROBES = 64  # the CRD's status.freeze.probes maxItems
MAX_FREEZE_DEPTH = 10_000
# Per-rank peak memory: the largest rank is the one that runs out first.
_PEAK_MEMORY = ("finetune_gpu_memory_peak_bytes", "finetune_cpu_memory_peak_bytes")
_INTEGER_FIELDS = ("epoch", "epochs", "gpuMemoryPeakBytes", "featureCacheBytes", "featureCacheViews", "freezeDepth",
                   "freezeBudgetBytes")
# The values a real trainer can report; anything else is dropped (status field -> [low, high]).
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "epoch": (0, 1_000_000),
    "epochs": (1, 1_000_000),
    "map50": (0, 1),
    "map50_95": (0, 1),
    "precision": (0, 1),
    "recall": (0, 1),
    "imagesPerSecond": (0, 1e9),
    "gpuMemoryPeakBytes": (0, 2**53),
    "trainLoss": (0, 1e9),
    "featureCacheBytes": (0, 2**53),
    "featureCacheBuildSeconds": (0, 1e8),
    "featureCacheViews": (1, 64),
    "freezeDepth": (0, MAX_FREEZE_DEPTH),
    "freezeBudgetBytes": (1, 2**53),
}


@dataclasses.dataclass
class TrainerMetrics:
    values: dict[str, float] = dataclasses.field(default_factory=dict)
    freeze_probes: dict[int, float] = dataclasses.field(default_factory=dict)  # depth -> peak bytes

    def as_status(self) -> dict[str, Any]:
        """The fields status.apply_trainer_metrics expects (ints where the CRD says integer)."""
        result: dict[str, Any] = {}
        for key, value in self.values.items():
            result[key] = int(value) if key in _INTEGER_FIELDS else round(float(value), 6)
        if self.freeze_probes:
            result["freezeProbes"] = [{"depth": d, "peakBytes": int(v)} for d, v in sorted(self.freeze_probes.items())]
        return result


def parse_metrics(text: str, finetune: str | None = None) -> TrainerMetrics:
    """Parse the exposition text; ``finetune`` restricts to series with that label (if present)."""
    values: dict[str, float] = {}
    peak: float | None = None
    losses: dict[str, float] = {}
    probes: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if finetune and labels.get("finetune") not in (None, finetune):
                continue
            if sample.name in _PEAK_MEMORY:
                peak = sample.value if peak is None else max(peak, sample.value)
                continue
            if labels.get("rank", "0") != "0":
                continue
            if sample.name in _RUN_GAUGES:
                values[_RUN_GAUGES[sample.name]] = sample.value
            elif sample.name == "finetune_train_loss":
                losses[labels.get("component", "")] = sample.value
            elif sample.name == _FREEZE_PROBE:
                depth = labels.get("depth", "")
                if depth.isdigit() and len(depth) <= 5 and len(probes) < MAX_FREEZE_PROBES:
                    probes[int(depth)] = sample.value
    if peak is not None:
        values["gpuMemoryPeakBytes"] = peak
    if losses:
        values["trainLoss"] = sum(losses.values())
    return TrainerMetrics(values, probes)


def metrics_url(pod: Mapping[str, Any], port: int) -> str | None:
    """http://<pod IP>:<port>/metrics, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


class ScrapeError(OSError):
    """The endpoint answered with something other than a metrics page we can use."""


def fetch(url: str, timeout: float = 2.0, max_bytes: int = MAX_SCRAPE_BYTES) -> str:
    """GET ``url`` (plain http) within one overall ``timeout`` and ``max_bytes`` of body.

    Written on a socket rather than with urllib/urllib3, whose timeouts apply to each read
    (and whose urlopen follows redirects): here every receive gets only what is left of the
    one deadline. The request is HTTP/1.0, so the answer is the body up to EOF (no chunking).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ScrapeError(f"not an http URL: {url}")
    deadline = time.monotonic() + timeout
    host = parts.hostname
    request = (f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.netloc}\r\n"
               "Accept: text/plain\r\nConnection: close\r\n\r\n").encode("ascii")
    limit = _MAX_HEADER_BYTES + max_bytes
    received = bytearray()
    with socket.create_connection((host, parts.port or 80), timeout=timeout) as sock:
        sock.sendall(request)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScrapeError(f"no complete answer within {timeout:g}s")
            sock.settimeout(left)
            chunk = sock.recv(min(65536, limit + 1 - len(received)))
            if not chunk:
                break
            received += chunk
            if len(received) > limit:
                raise ScrapeError(f"the answer is larger than {max_bytes} bytes")
    return _body(bytes(received), max_bytes)


def _body(answer: bytes, max_bytes: int) -> str:
    status = _STATUS_LINE.match(answer)
    if not status:
        raise ScrapeError("not an HTTP answer")
    if status.group(1) != b"200":  # a 3xx is a failed scrape: never follow it elsewhere
        raise ScrapeError(f"HTTP status {status.group(1).decode()}")
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = answer.partition(b"\n\n")
    if not sep or len(head) > _MAX_HEADER_BYTES:
        raise ScrapeError("malformed or oversized headers")
    if len(body) > max_bytes:
        raise ScrapeError(f"the answer is larger than {max_bytes} bytes")
    return body.decode("utf-8", errors="replace")


def scrape(url: str, finetune: str | None = None, timeout: float = 2.0,
           max_bytes: int = MAX_SCRAPE_BYTES) -> TrainerMetrics | None:
    """Metrics from ``url``, or None if the endpoint cannot be read or parsed in time."""
    try:
        metrics = parse_metrics(fetch(url, timeout, max_bytes), finetune)
    except (OSError, ValueError) as e:
        logger.debug("scrape of %s failed: %s", url, e)
        return None
    return drop_implausible(metrics, url)


def drop_implausible(metrics: TrainerMetrics, source: str) -> TrainerMetrics:
    """Only finite values inside ``VALUE_RANGES`` (and an epoch not past the epoch count)."""
    kept: dict[str, float] = {}
    for key, value in metrics.values.items():
        low, high = VALUE_RANGES.get(key, (-math.inf, math.inf))
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            logger.warning("dropping %s=%r from %s: not a finite value in [%g, %g]", key, value, source, low, high)
            continue
        kept[key] = value
    if "epoch" in kept and "epochs" in kept and kept["epoch"] > kept["epochs"]:
        logger.warning("dropping epoch=%r from %s: more than epochs=%r", kept["epoch"], source, kept["epochs"])
        del kept["epoch"]
    probes = {}
    for depth, value in metrics.freeze_probes.items():
        if not (0 <= depth <= MAX_FREEZE_DEPTH and isinstance(value, (int, float)) and math.isfinite(value)
                and 0 < value <= 2**53):
            logger.warning("dropping the freeze probe at depth %r=%r from %s: not a byte count", depth, value, source)
            continue
        probes[depth] = value
    return TrainerMetrics(kept, probes)
