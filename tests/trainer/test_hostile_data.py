"""Datasets from strangers: a data.yaml or image built to exhaust memory or crash the loader is
refused with one line or skipped and counted, never a traceback, a crash or a multi-GB decode."""

from __future__ import annotations

import pytest
import yaml

from finetune import cli
from finetune.data import load_data_config
from finetune.data.config import MAX_CLASS_NAME_CHARS, MAX_CLASSES, MAX_DATA_YAML_BYTES
from finetune.errors import FinetuneError
from test_data import make_dataset

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

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
