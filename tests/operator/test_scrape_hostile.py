"""The metrics scrape against hostile endpoints of our own (a FineTune's author controls rank 0).

Each server is real (a socket on loopback); the scrape must end by its one deadline, read at
most MAX_SCRAPE_BYTES, follow no redirect and drop values that are not finite or in range.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from finetune_operator import scrape

GOOD = (b"finetune_map50{finetune=\"ft\",rank=\"0\"} 0.61\n"
        b"finetune_epoch{finetune=\"ft\",rank=\"0\"} 3\n"
        b"finetune_epochs_total{finetune=\"ft\",rank=\"0\"} 10\n")
OK_HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"


@contextmanager
def server(handle: Callable[[socket.socket, dict], None],
           address: tuple[str, int] = ("127.0.0.1", 0)) -> Iterator[tuple[str, dict]]:
    """A loopback TCP server running ``handle(conn, stats)`` per connection, in threads."""
    listener = socket.create_server(address)
    stats: dict = {"connections": 0, "sent": 0, "closed_by_client": False}
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            stats["connections"] += 1
            threading.Thread(target=run, args=(conn,), daemon=True).start()

    def run(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # the request
            try:
                handle(conn, stats)
            except OSError:  # the scraper hung up
                stats["closed_by_client"] = True

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/metrics", stats
    finally:
        stop.set()
        thread.join()
        listener.close()


def send(conn: socket.socket, stats: dict, data: bytes) -> None:
    conn.sendall(data)
    stats["sent"] += len(data)


def endless_body(conn, stats):
    send(conn, stats, OK_HEAD)
    line = b"# " + b"x" * 65000 + b"\n"
    for _ in range(100_000):  # ~6 GB if nobody hangs up; the scraper must
        send(conn, stats, line)


def drip(conn, stats):
    for byte in OK_HEAD + GOOD * 1000:
        send(conn, stats, bytes([byte]))
        time.sleep(0.02)


def drip_headers(conn, stats):
    send(conn, stats, b"HTTP/1.0 200 OK\r\n")
    for _ in range(100_000):
        send(conn, stats, b"X-Pad: 1\r\n")
        time.sleep(0.02)


def silent(conn, stats):
    time.sleep(30)


def test_a_well_behaved_endpoint_is_read():
    with server(lambda conn, stats: send(conn, stats, OK_HEAD + GOOD)) as (url, _):
        values = scrape.scrape(url, "ft", timeout=2).values
    assert values == {"map50": 0.61, "epoch": 3, "epochs": 10}


@pytest.mark.parametrize("hostile", [endless_body, drip, drip_headers, silent])
def test_a_hostile_endpoint_fails_the_scrape_within_bounded_memory(hostile):
    with server(hostile) as (url, stats):
        tracemalloc.start()
        try:
            result = scrape.scrape(url, "ft", timeout=0.5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result is None
        assert peak < 3 * scrape.MAX_SCRAPE_BYTES, f"the scrape held {peak} bytes"
    if hostile is endless_body:
        assert stats["closed_by_client"], "the scraper kept reading an endless body"


def test_a_body_over_the_limit_is_a_failed_scrape():
    big = OK_HEAD + GOOD + b"# " + b"y" * scrape.MAX_SCRAPE_BYTES + b"\n"
    with server(lambda conn, stats: send(conn, stats, big)) as (url, _):
        assert scrape.scrape(url, "ft", timeout=2) is None
    small = OK_HEAD + GOOD + b"# " + b"y" * 1000 + b"\n"
    with server(lambda conn, stats: send(conn, stats, small)) as (url, _):
        assert scrape.scrape(url, "ft", timeout=2).values["map50"] == 0.61


@pytest.mark.parametrize("status", [b"301 Moved Permanently", b"302 Found", b"307 Temporary Redirect"])
def test_redirects_are_not_followed(status):
    with server(lambda conn, stats: send(conn, stats, OK_HEAD + GOOD)) as (target, target_stats):
        answer = b"HTTP/1.0 " + status + b"\r\nLocation: " + target.encode() + b"\r\n\r\n"
        with server(lambda conn, stats: send(conn, stats, answer)) as (url, _):
            assert scrape.scrape(url, "ft", timeout=2) is None
        assert target_stats["connections"] == 0, "the redirect was followed"


def test_values_that_are_not_finite_or_in_range_are_dropped(caplog):
    text = (b"finetune_map50{finetune=\"ft\",rank=\"0\"} NaN\n"
            b"finetune_map50_95{finetune=\"ft\",rank=\"0\"} +Inf\n"
            b"finetune_precision{finetune=\"ft\",rank=\"0\"} 7\n"
            b"finetune_recall{finetune=\"ft\",rank=\"0\"} 0.5\n"
            b"finetune_images_per_second{finetune=\"ft\",rank=\"0\"} -Inf\n"
            b"finetune_epoch{finetune=\"ft\",rank=\"0\"} 99\n"
            b"finetune_epochs_total{finetune=\"ft\",rank=\"0\"} 10\n"
            b"finetune_train_loss{finetune=\"ft\",rank=\"0\",component=\"box\"} 1e308\n"
            b"finetune_train_loss{finetune=\"ft\",rank=\"0\",component=\"obj\"} 1e308\n"
            b"finetune_gpu_memory_peak_bytes{finetune=\"ft\",rank=\"1\"} -5\n")
    with server(lambda conn, stats: send(conn, stats, OK_HEAD + text)) as (url, _):
        with caplog.at_level(logging.WARNING, logger="finetune_operator.scrape"):
            values = scrape.scrape(url, "ft", timeout=2).values
    assert values == {"recall": 0.5, "epochs": 10}
    for dropped in ("map50=nan", "map50_95=inf", "precision=7", "imagesPerSecond=-inf", "epoch=99",
                    "trainLoss=inf", "gpuMemoryPeakBytes=-5"):
        assert dropped in caplog.text, dropped
    # What survives is what the status patch gets: JSON-safe numbers only.
    assert all(isinstance(v, (int, float)) for v in scrape.TrainerMetrics(values).as_status().values())


def test_only_plain_http_urls_are_fetched():
    for url in ("file:///etc/passwd", "https://127.0.0.1:1/metrics", "ftp://x/"):
        assert scrape.scrape(url, "ft", timeout=0.5) is None
