"""Datasets from strangers: a data.yaml or image built to exhaust memory or crash the loader is
refused with one line or skipped and counted, never a traceback, a crash or a multi-GB decode."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import sys
import zlib

import pytest
import yaml
from PIL import Image

from finetune import cli
from finetune.data import YoloDataset, load_data_config
from finetune.data.config import MAX_CLASS_NAME_CHARS, MAX_CLASSES, MAX_DATA_YAML_BYTES
from finetune.data.dataset import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, decode_rgb
from finetune.errors import FinetuneError
from test_data import make_dataset, write_image, write_label
from trainer_helpers import run

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
    # PIL warns about the bombs it opens (and we then skip); the tests check the skip.
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

# Nine levels of ten: 10**9 strings once expanded, from a file of under 1 KiB.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{level}: &{level} [{', '.join(['*' + prev] * 10)}]\n" for prev, level in zip("abcdefgh", "bcdefghi")
)


def refusal(yaml_path) -> str:
    """The one-line FinetuneError loading ``yaml_path`` gives, checked to name the file."""
    with pytest.raises(FinetuneError) as err:
        load_data_config(yaml_path)
    message = str(err.value)
    assert str(yaml_path) in message and "\n" not in message, message
    return message


def with_data_yaml(tmp_path, text: str | bytes):
    """A valid dataset whose data.yaml is replaced by ``text``."""
    yaml_path = make_dataset(tmp_path)
    if isinstance(text, str):
        text = text.encode()
    yaml_path.write_bytes(text)
    return yaml_path


# ---------------------------------------------------------------------- data.yaml limits
def test_data_yaml_over_the_size_limit_is_refused_unread(tmp_path):
    valid = make_dataset(tmp_path).read_text()
    yaml_path = with_data_yaml(tmp_path, valid + "#" * (MAX_DATA_YAML_BYTES - len(valid)))
    load_data_config(yaml_path)  # exactly at the limit: fine
    with open(yaml_path, "a") as f:
        f.write("\n")
    assert "larger than 1 MiB" in refusal(yaml_path)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    # In an unused key: without the refusal this file would load (and expand if read).
    yaml_path = make_dataset(tmp_path)
    valid = yaml_path.read_text()
    yaml_path.write_text(valid + BILLION_LAUGHS)
    message = refusal(yaml_path)
    assert f"alias *a (line {valid.count(chr(10)) + 2})" in message and "may not" in message


def test_alias_through_the_cli_is_one_error_line_and_exit_2(tmp_path, capsys):
    yaml_path = with_data_yaml(tmp_path, yaml.safe_dump({"train": "images/train", "val": "images/val"})
                               + "base: &base [a, b]\nnames: *base\n")
    assert cli.main(["train", "--data", str(yaml_path), "--out", str(tmp_path / "run")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "alias *base" in lines[0], lines


@pytest.mark.parametrize("form", ["list", "mapping"])
def test_more_classes_than_the_limit_are_refused(tmp_path, form):
    names = [f"c{i}" for i in range(MAX_CLASSES)]
    assert load_data_config(make_dataset(tmp_path, spec={"names": names})).nc == MAX_CLASSES
    names.append("one too many")
    spec = {"names": names if form == "list" else dict(enumerate(names))}
    assert f"{MAX_CLASSES + 1} classes, more than the limit of {MAX_CLASSES}" in refusal(make_dataset(tmp_path, spec=spec))


def test_nc_over_the_limit_is_refused(tmp_path):
    message = refusal(make_dataset(tmp_path, spec={"names": None, "nc": MAX_CLASSES + 1}))
    assert f"more than the limit of {MAX_CLASSES} classes" in message


def test_class_name_over_the_limit_is_refused(tmp_path):
    longest = "x" * MAX_CLASS_NAME_CHARS
    assert load_data_config(make_dataset(tmp_path, spec={"names": ["a", longest]})).names[1] == longest
    message = refusal(make_dataset(tmp_path, spec={"names": ["a", longest + "x"]}))
    assert f"class 1's name is {MAX_CLASS_NAME_CHARS + 1} characters" in message


@pytest.mark.parametrize(
    "content, words",
    [
        (b"path: .\n\ttrain: images/train\n", ["not valid YAML", "'\\t'", "line 2"]),
        (bytes(range(1, 32)) * 8, ["not valid YAML", "unacceptable character"]),
        (b"names: [caf\xe9]\n", ["not UTF-8", "0xe9 at offset 11"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["not UTF-8", "0x89 at offset 0"]),
        (b"- a\n- b\n", ["expected a mapping", "list"]),
        (b"just a sentence\n", ["expected a mapping", "str"]),
        (b"train: images/train\nval: images/val\nnames: [a]\nmade: 2024-13-01\n", ["not valid YAML", "month"]),
        (b"nc: " + b"9" * 5000 + b"\n", ["not valid YAML", "4300 digits"]),
        (b"names: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", ["nested too deeply"]),
        (b"train: !!python/object/apply:os.system [echo]\n", ["not valid YAML", "constructor"]),
    ],
    ids=["tab", "control-chars", "latin-1", "binary", "list", "scalar", "bad-date", "huge-int", "deep", "python-tag"],
)
def test_malformed_data_yaml_is_one_line(tmp_path, content, words):
    message = refusal(with_data_yaml(tmp_path, content))
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------------- image bombs
# 12000x12000 is 144 Mpx: over our cap but under twice PIL's, where PIL only warns, so without
# the cap such a file passes the header check and decodes to 432 MB. 30000x30000 PIL refuses.
BIG, HUGE = 12_000, 30_000


def png_bytes(width: int, height: int, rows: int | None = None, filter_byte: int = 0) -> bytes:
    """An 8-bit gray PNG of zeros, a few hundred KB even at 12000x12000. ``rows`` fewer than
    ``height`` leaves the image data short; a ``filter_byte`` over 4 is one libpng rejects."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = height if rows is None else rows
    compressor = zlib.compressobj(9)
    row = bytes([filter_byte]) + bytes(width)
    idat = b"".join(compressor.compress(row * min(256, rows - i)) for i in range(0, rows, 256)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def claiming(fmt: str, width: int, height: int) -> bytes:
    """A tiny real JPEG or BMP whose header is rewritten to declare ``width`` x ``height``
    (libjpeg fills the missing data with gray: decoded, it really is that big)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 80, 120)).save(buffer, fmt)
    data = bytearray(buffer.getvalue())
    if fmt == "JPEG":
        sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
        struct.pack_into(">HH", data, sof + 5, height, width)
    else:
        struct.pack_into("<ii", data, 18, width, height)  # BITMAPINFOHEADER width, height
    return bytes(data)


def test_images_declaring_too_many_pixels_are_skipped_and_counted(tmp_path):
    d = tmp_path / "images"
    good = write_image(d / "good.jpg")
    write_label(good, ["0 0.5 0.5 0.2 0.2"])
    bombs = {
        "big.png": png_bytes(BIG, BIG, rows=4), "huge.png": png_bytes(HUGE, HUGE, rows=4),
        "big.jpg": claiming("JPEG", BIG, BIG), "huge.jpg": claiming("JPEG", HUGE, HUGE),
        "big.bmp": claiming("BMP", BIG, BIG), "huge.bmp": claiming("BMP", HUGE, HUGE),
    }
    for name, data in bombs.items():
        (d / name).write_bytes(data)
    ds = YoloDataset([good, *(d / name for name in bombs)], imgsz=32, nc=1)
    assert ds.stats["images"] == 1 and ds.stats["skipped_images"] == 6
    reasons = dict(ds.skipped)
    assert reasons[str(d / "big.jpg")] == f"too large ({BIG}x{BIG}, over {MAX_IMAGE_PIXELS} pixels; {MAX_IMAGE_PIXELS_ENV} raises the limit)"
    assert all(reason.startswith("too large (") for reason in reasons.values()), reasons
    assert "6 unusable images skipped" in ds.summary() and "too large" in ds.summary()


def test_pixel_cap_is_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    small = write_image(tmp_path / "images" / "small.jpg", size=(50, 50))
    wide = write_image(tmp_path / "images" / "wide.png", size=(64, 48))
    write_label(small, ["0 0.5 0.5 0.2 0.2"])
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "3000")
    ds = YoloDataset([small, wide], imgsz=32, nc=1)
    assert ds.image_paths == [small] and ds.skipped == [(str(wide), "too large (64x48, over 3000 pixels; "
                                                                     f"{MAX_IMAGE_PIXELS_ENV} raises the limit)")]
    # The decode path checks the header again (a file swapped after the check), from the same bytes it decodes.
    assert decode_rgb(wide, max_pixels=3000) is None and decode_rgb(wide, max_pixels=3072) is not None
    # Raised above PIL's own limit, PIL no longer refuses what the cap allows.
    huge = tmp_path / "images" / "huge.jpg"
    huge.write_bytes(claiming("JPEG", HUGE, HUGE))
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(HUGE * HUGE))
    assert YoloDataset([small, huge], imgsz=32, nc=1).stats["skipped_images"] == 0
    for bad in ("lots", "0", "-5", "1e9"):
        monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, bad)
        with pytest.raises(FinetuneError, match=f"{MAX_IMAGE_PIXELS_ENV}='{bad}' is not a positive number of pixels"):
            YoloDataset([small], imgsz=32, nc=1)


# Run in a fresh process: its peak RSS is the measure, and a decoder crash must fail a test,
# not take the whole session down. Prints one JSON line per part, so a crash shows where.
HOSTILE_IMAGES_SCRIPT = """
import json, resource, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from finetune.data import YoloDataset

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

root = Path(sys.argv[1])
warm = YoloDataset([root / "good.jpg", root / "good.png"], imgsz=64, nc=1)
[warm[i] for i in range(len(warm))]  # the decoders' first-use allocations belong in the baseline
baseline = peak_mib()
bombs = YoloDataset([root / "good.jpg", *sorted((root / "bombs").iterdir())], imgsz=64, nc=1)
[bombs[i] for i in range(len(bombs))]
swapped = YoloDataset([root / "swap.jpg", root / "swap.png"], imgsz=64, nc=1)
for name in ("swap.jpg", "swap.png"):  # replaced by a bomb after the header check
    (root / name).write_bytes((root / "bombs" / name.replace("swap", "big")).read_bytes())
swapped_targets = [len(swapped[i][1]) for i in range(len(swapped))]
print(json.dumps({"part": "bombs", "kept": bombs.stats["images"], "skipped": bombs.stats["skipped_images"],
                  "swapped_targets": swapped_targets, "growth_mib": peak_mib() - baseline}), flush=True)
corrupt = YoloDataset(sorted((root / "corrupt").iterdir()), imgsz=64, nc=1)
items = [corrupt[i] for i in range(len(corrupt))]
print(json.dumps({"part": "corrupt", "kept": corrupt.stats["images"],
                  "targets": [len(item[1]) for item in items]}), flush=True)
"""


@pytest.fixture(scope="module")
def hostile_images_run(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hostile")
    for name in ("good.jpg", "good.png", "swap.jpg", "swap.png"):
        write_label(write_image(root / name), ["0 0.5 0.5 0.2 0.2"])
    (root / "bombs").mkdir()
    (root / "bombs" / "big.png").write_bytes(png_bytes(BIG, BIG))  # all rows: a real 144 Mpx image
    (root / "bombs" / "big.jpg").write_bytes(claiming("JPEG", BIG, BIG))
    (root / "bombs" / "huge.png").write_bytes(png_bytes(HUGE, HUGE, rows=4))
    # PNGs whose chunks are intact (PIL's header check passes) but whose image data libpng rejects.
    for name, data in {"short.png": png_bytes(64, 64, rows=4), "bad-filter.png": png_bytes(64, 64, filter_byte=9)}.items():
        write_label(root / "corrupt" / name, ["0 0.5 0.5 0.2 0.2"])
        (root / "corrupt" / name).write_bytes(data)
    done = run([sys.executable, "-c", HOSTILE_IMAGES_SCRIPT, str(root)], timeout=300)
    parts = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            part = json.loads(line)
            parts[part.pop("part")] = part
    return {"returncode": done.returncode, "stderr": done.stderr[-3000:], **parts}


def test_image_bombs_are_never_decoded(hostile_images_run):
    bombs = hostile_images_run.get("bombs")
    assert bombs is not None, hostile_images_run
    assert bombs["kept"] == 1 and bombs["skipped"] == 3
    assert bombs["swapped_targets"] == [0, 0]  # decoded as blank images without their labels
    assert bombs["growth_mib"] < 256, bombs  # one decoded bomb alone is 432 MB


def test_png_that_libpng_rejects_does_not_kill_the_process(hostile_images_run):
    assert hostile_images_run["returncode"] == 0, hostile_images_run
    assert hostile_images_run["corrupt"]["kept"] == 2, hostile_images_run


# ---------------------------------------------------------------------- file names
NOT_UTF8 = os.fsdecode(b"\xff\xfe-photo")  # Python keeps the bytes as lone surrogates


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_file_names_that_are_not_utf8_load_their_real_pixels(tmp_path, caplog, suffix):
    img = write_image(tmp_path / "images" / f"{NOT_UTF8}{suffix}", size=(64, 64), color=(114, 114, 114),
                      rect=(16, 16, 48, 48))
    write_label(img, ["0 0.5 0.5 0.5 0.5"])
    with caplog.at_level(logging.WARNING):
        ds = YoloDataset([img], imgsz=64, nc=1)
        image, targets, _ = ds[0]
    assert caplog.records == []
    assert ds.stats["skipped_images"] == 0 and targets.shape == (1, 6)
    assert image[:, 32, 32].min() > 240 and image[:, 4, 4].max() < 130  # the white square, not a blank image


def test_messages_naming_non_utf8_files_are_printable(tmp_path, caplog):
    garbage = tmp_path / "images" / f"{NOT_UTF8}.jpg"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not an image")
    with pytest.raises(FinetuneError) as err:
        YoloDataset([garbage], imgsz=32, nc=1)
    assert "\\xff\\xfe-photo.jpg" in str(err.value)
    good = write_image(tmp_path / "images" / f"{NOT_UTF8}-ok.jpg")
    write_label(good, ["0 0.5 0.5 0.2 0.2"])
    ds = YoloDataset([good, garbage], imgsz=32, nc=1)
    good.unlink()  # so loading it logs a warning naming it
    with caplog.at_level(logging.WARNING):
        assert ds[0][1].shape == (0, 6)
    for message in (ds.summary(), str(err.value), *(record.getMessage() for record in caplog.records)):
        message.encode("utf-8")  # strict: a lone surrogate would fail a UTF-8 log file or terminal
    assert "\\xff\\xfe-photo.jpg: not an image" in ds.summary()
    assert len(caplog.records) == 1 and "\\xff\\xfe-photo-ok.jpg" in caplog.records[0].getMessage()
