"""A corpus of hostile weights files, built here, against every path that reads weights.

Each file must be refused with one ``error:`` line naming it, exit code 2 (permanent for the
operator), no side effect (a sentinel file a payload would create never appears), no call to
``torch.load``, ``torch.jit.load`` or ``pickle`` (patched to record and fail if called), and
memory within a bound measured by the subprocess's own peak RSS (``RLIMIT_AS`` is useless:
``import torch`` alone maps gigabytes of address space).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.serialization import LEGACY_CONVERSION, MAX_STAND_IN_CLASSES, read_torch_file

REPO = Path(__file__).resolve().parents[2]
MEMORY_BOUND_MIB = 256

# --------------------------------------------------------------------------- a pickle writer
# Protocol-2 opcodes, written by hand so that a file can say what no well-behaved pickler
# would (torch.save refuses to write most of these).


class G:
    """A GLOBAL reference ``module.name``."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """``func(*args)`` by REDUCE, optionally followed by BUILD with ``state``."""

    opcode = b"R"

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state


class New(Call):
    """``cls.__new__(cls, *args)`` by NEWOBJ, then BUILD with ``state`` when given."""

    opcode = b"\x81"


class PersId:
    """A persistent id (a tensor storage reference)."""

    def __init__(self, *parts):
        self.parts = parts


def dumps(value) -> bytes:
    out = bytearray(b"\x80\x02")

    def emit(v):
        if isinstance(v, G):
            out.extend(b"c" + v.module.encode() + b"\n" + v.name.encode() + b"\n")
        elif isinstance(v, Call):
            emit(v.func)
            emit(tuple(v.args))
            out.extend(v.opcode)
            if v.state is not None:
                emit(v.state)
                out.extend(b"b")
        elif isinstance(v, PersId):
            emit(tuple(v.parts))
            out.extend(b"Q")
        elif v is None:
            out.extend(b"N")
        elif v is True or v is False:
            out.extend(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            if -(2**31) <= v < 2**31:
                out.extend(b"J" + struct.pack("<i", v))
            else:
                data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(data)]) + data)
        elif isinstance(v, str):
            data = v.encode()
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(v, tuple):
            out.extend(b"(")
            for item in v:
                emit(item)
            out.extend(b"t")
        elif isinstance(v, list):
            out.extend(b"](")
            for item in v:
                emit(item)
            out.extend(b"e")
        elif isinstance(v, dict):
            out.extend(b"}(")
            for k, item in v.items():
                emit(k)
                emit(item)
            out.extend(b"u")
        else:
            raise TypeError(v)

    emit(value)
    out.extend(b".")
    return bytes(out)


def write_archive(path: Path, pickled: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch.save-style zip written by torch's own writer."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", pickled, len(pickled))
    for name, data in (records or {}).items():
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return path


def tensor_v2(storage, offset, size, stride):
    return Call(G("torch._utils", "_rebuild_tensor_v2"), storage, offset, size, stride, False,
                Call(G("collections", "OrderedDict")))


def float_storage(key="0", numel=4):
    return PersId("storage", G("torch", "FloatStorage"), key, "cpu", numel)


FOUR_FLOATS = {"data/0": struct.pack("<4f", 1, 2, 3, 4)}


def shell(sentinel: Path) -> str:
    return f"touch {sentinel}"


def py(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


class RunsCode:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# --------------------------------------------------------------------------- the corpus


def build_corpus(d: Path, sentinel: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its refusal must contain)."""
    c: dict[str, tuple[Path, str]] = {}

    def add(name, path, phrase):
        c[name] = (path, phrase)

    evil = {"model": RunsCode(os.system, shell(sentinel))}
    torch.save(evil, d / "zip-os-system.pt")
    add("zip-os-system", d / "zip-os-system.pt", "posix.system")
    torch.save(evil, d / "legacy-os-system.pt", _use_new_zipfile_serialization=False)
    add("legacy-os-system", d / "legacy-os-system.pt", "legacy")
    (d / "raw-pickle.pt").write_bytes(pickle.dumps(evil, protocol=2))
    add("raw-pickle", d / "raw-pickle.pt", "not a readable PyTorch checkpoint")
    with tarfile.open(d / "legacy-tar.pt", "w") as tar:  # the pre-1.0 layout: pickles in a tar
        for member in ("sys_info", "pickle", "storages", "tensors"):
            data = pickle.dumps(evil, protocol=2)
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    add("legacy-tar", d / "legacy-tar.pt", "legacy")
    # A legacy file whose one storage declares 2**31-1 floats (8 GiB) and holds 4.
    torch.save({"w": torch.zeros(4)}, d / "legacy-huge.pt", _use_new_zipfile_serialization=False)
    data = (d / "legacy-huge.pt").read_bytes().replace(struct.pack("<i", 4), struct.pack("<i", 2**31 - 1))
    (d / "legacy-huge.pt").write_bytes(data)
    add("legacy-huge-storage", d / "legacy-huge.pt", "legacy")

    # GLOBALs that run code, each with a payload that would create the sentinel.
    imp = Call(G("builtins", "__import__"), "os")
    code_globals = {
        "builtins-getattr": Call(Call(G("builtins", "getattr"), imp, "system"), shell(sentinel)),
        "builtins-exec": Call(G("builtins", "exec"), py(sentinel)),
        "builtins-eval": Call(G("builtins", "eval"), py(sentinel)),
        "operator-methodcaller": Call(Call(G("operator", "methodcaller"), "system", shell(sentinel)), imp),
        "operator-attrgetter": Call(Call(Call(G("operator", "attrgetter"), "system"), imp), shell(sentinel)),
        "functools-partial": Call(Call(G("functools", "partial"), G("builtins", "exec"), py(sentinel))),
        "functools-reduce": Call(G("functools", "reduce"), G("builtins", "exec"), [py(sentinel)]),
        "numpy-runstring": Call(G("numpy.testing._private.utils", "runstring"), py(sentinel), {}),
        "numpy-load": Call(G("numpy", "load"), str(d / "x.npy"), None, True),
        "posix-system": Call(G("posix", "system"), shell(sentinel)),
        "subprocess-popen": Call(G("subprocess", "Popen"), ["touch", str(sentinel)]),
        # In torch's own default allow-list, each a memory bomb of a few bytes.
        "bytearray-bomb": Call(G("builtins", "bytearray"), 3 * 2**30),
        "tensor-newobj-bomb": New(G("torch", "Tensor"), 2**31),
        "float-tensor-bomb": Call(G("torch", "FloatTensor"), 2**31),
        # Attributes set on a tensor, which shadow its methods (torch allows both by default).
        "parameter-with-state": Call(G("torch._utils", "_rebuild_parameter_with_state"),
                                     tensor_v2(float_storage(), 0, (4,), (1,)), False,
                                     Call(G("collections", "OrderedDict")), {"float": "shadowed"}),
        "rebuild-from-type": Call(G("torch._tensor", "_rebuild_from_type_v2"), G("torch._utils", "_rebuild_tensor_v2"),
                                  G("torch", "Tensor"),
                                  (float_storage(), 0, (4,), (1,), False, Call(G("collections", "OrderedDict"))),
                                  {"detach": "shadowed"}),
    }
    for name, payload in code_globals.items():
        add(name, write_archive(d / f"{name}.pt", dumps({"model": payload}), FOUR_FLOATS), "refused")

    # torch's rebuild functions with offsets, sizes and strides outside the storage.
    rebuilds = {
        "offset-out-of-bounds": (tensor_v2(float_storage(), 100, (4,), (1,)), "outside its storage"),
        "size-out-of-bounds": (tensor_v2(float_storage(), 0, (1000,), (1,)), "outside its storage"),
        "stride-out-of-bounds": (tensor_v2(float_storage(), 0, (4, 4), (4, 1)), "outside its storage"),
        "zero-stride-inflation": (tensor_v2(float_storage(), 0, (10**6, 10**6), (0, 0)), "claims"),
        "declared-storage-bomb": (tensor_v2(float_storage(numel=2**40), 0, (4,), (1,)), "declares"),
        "negative-stride": (tensor_v2(float_storage(), 3, (4,), (-1,)), "not a readable"),
        "missing-storage-record": (tensor_v2(float_storage(key="7"), 0, (4,), (1,)), "no such record"),
        "malformed-storage-id": (tensor_v2(PersId("storage", G("torch", "FloatStorage"), 0, "cpu", -1), 0, (4,), (1,)),
                                 "malformed"),
    }
    for name, (payload, phrase) in rebuilds.items():
        add(name, write_archive(d / f"{name}.pt", dumps({"model": {"w": payload}}), FOUR_FLOATS), phrase)

    # State that shadows methods: an OrderedDict whose BUILD sets an attribute named "items".
    shadow = Call(G("collections", "OrderedDict"), state={"items": "shadowed", "keys": 1})
    add("dict-shadows-items", write_archive(d / "dict-shadows.pt", dumps({"model": shadow}), FOUR_FLOATS), "shadow")

    # TorchScript: plain, and with zip quirks that Python's zipfile rejects but torch accepts.
    scripted = d / "scripted.pt"
    torch.jit.script(nn.Conv2d(1, 1, 1)).save(str(scripted))
    add("torchscript", scripted, "TorchScript")
    for quirk in ("non-utf8-name", "corrupt-extra-field"):
        path = d / f"torchscript-{quirk}.pt"
        path.write_bytes(zip_quirk(scripted.read_bytes(), quirk))
        add(f"torchscript-{quirk}", path, "TorchScript")

    # Deflate-compressed records that inflate far past the space they take in the file.
    add("compressed-storage-bomb", compressed_bomb(d / "deflate-storage.pt", "data/0"), "more than it occupies")
    add("compressed-pickle-bomb", compressed_bomb(d / "deflate-pickle.pt", "data.pkl"), "more than it occupies")

    # More stand-in classes than any model has.
    many = [New(G("models.common", f"C{i}")) for i in range(MAX_STAND_IN_CLASSES + 1)]
    add("too-many-stand-ins", write_archive(d / "many.pt", dumps({"model": many})), "model classes")

    # Garbage, truncated, and nesting deeper than Python's recursion limit.
    (d / "garbage.pt").write_bytes(os.urandom(4096))
    add("garbage", d / "garbage.pt", "not a readable PyTorch checkpoint")
    torch.save({"model": {"w": torch.zeros(1000)}}, d / "whole.pt")
    whole = (d / "whole.pt").read_bytes()
    (d / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    add("truncated", d / "truncated.pt", "not a readable PyTorch checkpoint")
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."
    add("deeply-nested", write_archive(d / "deep.pt", deep), "nests objects deeper")
    return c


def zip_quirk(data: bytes, quirk: str) -> bytes:
    """Patch the central-directory entry of the TorchScript debug record (optional to torch)."""
    b = bytearray(data)
    i = b.find(b"PK\x01\x02")
    while i != -1:
        nlen = struct.unpack_from("<H", b, i + 28)[0]
        name = bytes(b[i + 46:i + 46 + nlen])
        if name.endswith(b".debug_pkl"):
            if quirk == "non-utf8-name":  # the UTF-8 flag is set; this byte is not UTF-8
                b[i + 46 + name.index(b"debug")] = 0xFF
            else:  # the name's last 4 bytes become an extra field that claims 255 bytes
                struct.pack_into("<HH", b, i + 28, nlen - 4, 4)
                b[i + 46 + nlen - 4:i + 46 + nlen] = b"\x01\x00\xff\x00"
        i = b.find(b"PK\x01\x02", i + 46 + nlen)
    return bytes(b)


def compressed_bomb(path: Path, record: str) -> Path:
    """A torch-style archive whose ``record`` holds 768 MiB that deflate to under 1 MiB."""
    bomb_bytes = 768 * 2**20
    numel = bomb_bytes // 4
    pickled = dumps({"model": {"w": tensor_v2(float_storage(numel=numel), 0, (numel,), (1,))}})
    if record == "data.pkl":  # a pickle whose one string is the bomb
        pickled = None
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("version", "byteorder"):
            zf.writestr(f"archive/{name}", b"3\n" if name == "version" else b"little")
        with zf.open(f"archive/{record}", "w", force_zip64=True) as f:
            if pickled is None:
                f.write(b"\x80\x02X" + struct.pack("<I", bomb_bytes))
            chunk = bytes(2**24)
            for _ in range(bomb_bytes // len(chunk)):
                f.write(chunk)
            if pickled is None:
                f.write(b".")
        if record != "data.pkl":
            zf.writestr("archive/data.pkl", pickled)
    return path


# --------------------------------------------------------------------------- the harness

HARNESS = textwrap.dedent("""
    import io, json, os, pickle, resource, sys
    calls = []
    class Switch(io.TextIOBase):  # logging handlers keep the stream they were given
        buffer = io.StringIO()
        def write(self, s):
            return Switch.buffer.write(s)
    sys.stderr = Switch()
    import torch
    import torch.jit
    def forbidden(name):
        def call(*a, **k):
            calls.append(name)
            raise AssertionError(name + " must not be called on a user file")
        return call
    torch.load = forbidden("torch.load")
    torch.jit.load = forbidden("torch.jit.load")
    torch.serialization.load = forbidden("torch.serialization.load")
    pickle.load = forbidden("pickle.load")
    pickle.loads = forbidden("pickle.loads")
    class ForbiddenUnpickler:
        def __init__(self, *a, **k):
            forbidden("pickle.Unpickler")()
    pickle.Unpickler = ForbiddenUnpickler
    from finetune.cli import main

    spec = json.loads(sys.argv[1])
    def run(argv):
        Switch.buffer = io.StringIO()
        rc = main(argv)
        return rc, Switch.buffer.getvalue()
    for argv in spec["warmup"]:
        run(argv)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    for name, commands in spec["cases"].items():
        results[name] = [run(argv) for argv in commands]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "calls": calls, "results": results}))
""")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from finetune.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), classes=["circle", "square"],
                                  n_train=4, n_val=2, imgsz=64, seed=0)


@pytest.mark.slow
def test_hostile_weights_are_refused_on_every_path(tmp_path, tiny_data):
    sentinel = tmp_path / "SENTINEL"
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    corpus = build_corpus(corpus_dir, sentinel)
    assert not sentinel.exists()

    def commands(weights: Path, name: str) -> list[list[str]]:
        resume_dir = tmp_path / "resume" / name
        resume_dir.mkdir(parents=True)
        (resume_dir / "last.pt").write_bytes(weights.read_bytes())
        train = ["train", "--data", str(tiny_data), "--model", "yolov5n", "--epochs", "1", "--batch", "2",
                 "--imgsz", "64", "--workers", "0", "--device", "cpu"]
        return [
            train + ["--weights", str(weights), "--out", str(tmp_path / "runs" / name)],
            ["val", "--data", str(tiny_data), "--weights", str(weights), "--imgsz", "64", "--workers", "0",
             "--device", "cpu"],
            train + ["--resume", "--out", str(resume_dir)],
        ]

    warm = corpus_dir / "warmup-garbage.pt"
    warm.write_bytes(b"\0" * 100)
    spec = {"warmup": commands(warm, "warmup"),
            "cases": {name: commands(path, name) for name, (path, _) in corpus.items()}}
    proc = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert not sentinel.exists(), "a payload ran"
    assert report["calls"] == [], f"forbidden loaders were called: {report['calls']}"
    grown_mib = (report["peak_kib"] - report["baseline_kib"]) / 1024
    print(f"peak RSS over the corpus: +{grown_mib:.0f} MiB (baseline {report['baseline_kib'] / 1024:.0f} MiB)")
    assert grown_mib <= MEMORY_BOUND_MIB, f"peak RSS grew {grown_mib:.0f} MiB over the corpus"
    for name, (path, phrase) in corpus.items():
        for (rc, output), command in zip(report["results"][name], ("train --weights", "val --weights", "--resume")):
            lines = output.strip().splitlines()
            assert "Traceback" not in output, f"{name} / {command}: {output}"
            assert rc == 2, f"{name} / {command}: exit {rc}: {output}"
            errors = [line for line in lines if line.startswith("error:")]
            assert len(errors) == 1 and lines[-1] == errors[0], f"{name} / {command}: {output}"
            shown = path if command != "--resume" else tmp_path / "resume" / name / "last.pt"
            assert str(shown) in errors[0], f"{name} / {command}: {errors[0]}"
            if command != "--resume" or phrase != "model classes":
                assert phrase in errors[0], f"{name} / {command}: {errors[0]}"


def test_the_quirky_archives_fool_zipfile_but_not_torch(tmp_path):
    """The corpus' TorchScript quirks are what the review found: zipfile rejects, torch reads."""
    scripted = tmp_path / "s.pt"
    torch.jit.script(nn.Conv2d(1, 1, 1)).save(str(scripted))
    for quirk in ("non-utf8-name", "corrupt-extra-field"):
        path = tmp_path / f"{quirk}.pt"
        path.write_bytes(zip_quirk(scripted.read_bytes(), quirk))
        with pytest.raises((zipfile.BadZipFile, UnicodeDecodeError)):
            zipfile.ZipFile(path).namelist()
        assert torch._C.PyTorchFileReader(str(path)).has_record("constants.pkl")
        with pytest.raises(FinetuneError, match="TorchScript"):
            read_torch_file(path)


def test_size_cap_is_configurable_and_refuses_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    monkeypatch.setenv("FINETUNE_MAX_WEIGHTS_BYTES", "1000")
    with pytest.raises(FinetuneError, match="more than FINETUNE_MAX_WEIGHTS_BYTES=1000"):
        read_torch_file(path)
    monkeypatch.setenv("FINETUNE_MAX_WEIGHTS_BYTES", "lots")
    with pytest.raises(FinetuneError, match="expected a positive number of bytes"):
        read_torch_file(path)
    monkeypatch.setenv("FINETUNE_MAX_WEIGHTS_BYTES", str(10**6))
    assert torch.equal(read_torch_file(path)["w"], torch.zeros(1000))


def test_tensors_come_back_clean_and_shared_storage_stays_shared(tmp_path):
    base = torch.arange(12.0)
    path = tmp_path / "views.pt"
    torch.save({"a": base, "b": base[2:8].view(2, 3), "p": nn.Parameter(torch.ones(2)), "od": OrderedDict(x=1)}, path)
    out = read_torch_file(path, allow_stand_ins=False)
    assert type(out["a"]) is torch.Tensor and type(out["p"]) is torch.Tensor and not out["p"].requires_grad
    assert torch.equal(out["b"], base[2:8].view(2, 3))
    assert out["b"].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()
    assert type(out["od"]) is OrderedDict and out["od"] == {"x": 1}


def test_our_own_checkpoints_refuse_stand_ins_on_resume(tmp_path):
    from finetune.checkpoint import load_resume_checkpoint

    last = tmp_path / "last.pt"
    write_archive(last, dumps({"format": "finetune/v1", "model": New(G("models.yolo", "DetectionModel"))}))
    with pytest.raises(FinetuneError, match=r"cannot resume: .*models\.yolo\.DetectionModel"):
        load_resume_checkpoint(last)


def test_a_weights_file_whose_name_is_not_utf8_is_read_by_its_bytes(tmp_path):
    path = Path(os.fsdecode(bytes(tmp_path) + b"/w\xff\xfe.pt"))
    with open(path, "wb") as f:
        torch.save({"w": torch.arange(3.0)}, f)
    assert torch.equal(read_torch_file(path)["w"], torch.arange(3.0))


def test_compare_refuses_hostile_weights_in_one_line_before_any_run(tmp_path, tiny_data):
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(os.system, shell(sentinel))}, evil)
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "compare", "--data", str(tiny_data), "--model",
                           "yolov5n", "--weights", str(evil), "--epochs", "1", "--imgsz", "64", "--out",
                           str(tmp_path / "cmp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: weights file {evil} was refused: it references posix.system")
    assert not sentinel.exists() and not (tmp_path / "cmp" / "freeze-0").exists()


def test_the_documented_legacy_conversion_works(tmp_path):
    """The refusal's one-liner (also in the trainer contract) turns a trusted legacy file into one we read."""
    assert LEGACY_CONVERSION in (REPO / "docs" / "trainer-contract.md").read_text().replace("\n  ", " ")
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save({"model": {"w": torch.arange(4.0)}}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(FinetuneError, match="legacy") as refusal:
        read_torch_file(old)
    assert LEGACY_CONVERSION in str(refusal.value)
    command = LEGACY_CONVERSION.replace("python", sys.executable, 1).replace("OLD.pt NEW.pt", f"{old} {new}")
    subprocess.run(command, shell=True, check=True, timeout=120)
    assert torch.equal(read_torch_file(new)["model"]["w"], torch.arange(4.0))
