"""Checkpoint reading: our checkpoints, Ultralytics-style pickled modules, refusals."""

from __future__ import annotations

import argparse
import builtins
import copy
import logging
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models import common
from finetune.models.weights import load_checkpoint, load_pretrained
from finetune.models.yolo import Detect, DetectionModel

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

FOREIGN = {  # our class -> (Ultralytics module, class name)
    DetectionModel: ("models.yolo", "DetectionModel"),
    Detect: ("models.yolo", "Detect"),
    common.Conv: ("models.common", "Conv"),
    common.C3: ("models.common", "C3"),
    common.Bottleneck: ("models.common", "Bottleneck"),
    common.SPPF: ("models.common", "SPPF"),
    common.Concat: ("models.common", "Concat"),
}


# The two layouts Ultralytics checkpoints come in: a clone of the repository pickles
# ``models.yolo.*``, a model trained with ``pip install yolov5`` pickles ``yolov5.models.yolo.*``.
LAYOUTS = {"repository": "", "pypi-yolov5": "yolov5."}


def save_as_ultralytics(model: nn.Module, path: pathlib.Path, plant=None, layout: str = "repository",
                        **extras) -> None:
    """Pickle ``model`` (half precision) as if its classes were Ultralytics' own.

    Fake ``models``, ``models.yolo`` and ``models.common`` modules (under ``yolov5.`` for the
    PyPI layout) exist only while saving, so loading must work without them (as it must
    without Ultralytics installed). ``plant`` is set as an attribute of module 3 after
    copying (deepcopy would run it).
    """
    prefix = LAYOUTS[layout]
    names = [prefix + n for n in ("models", "models.yolo", "models.common")] + (["yolov5"] if prefix else [])
    fakes = {name: types.ModuleType(name) for name in names}
    foreign = {}
    for ours, (mod, name) in FOREIGN.items():
        cls = type(name, (nn.Module,), {"__module__": prefix + mod})
        setattr(fakes[prefix + mod], name, cls)
        foreign[ours] = cls
    clone = copy.deepcopy(model).half()
    for m in clone.modules():
        if type(m) in foreign:
            m.__class__ = foreign[type(m)]
    if plant is not None:
        clone.model[3].hook = plant
    saved = dict(sys.modules)
    sys.modules.update(fakes)
    try:
        torch.save({"model": clone, "ema": None, **extras}, path)
    finally:
        for name in fakes:
            sys.modules.pop(name, None)
            if name in saved:
                sys.modules[name] = saved[name]


@pytest.fixture(scope="module")
def source() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n", nc=80).eval()


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def ultralytics_pt(source, tmp_path_factory, request) -> pathlib.Path:
    path = tmp_path_factory.mktemp("ult") / "yolov5n.pt"
    source.names = [f"class{i}" for i in range(80)]
    save_as_ultralytics(
        source, path, layout=request.param, epoch=3, best_fitness=np.array([0.42]), updates=120, optimizer=None,
        opt=argparse.Namespace(epochs=300, save_dir=pathlib.Path("runs/train/exp")),
        date="2024-01-01T00:00:00", git={"remote": "x", "branch": "master"},
    )
    return path


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)[0]


def test_ultralytics_checkpoint_loads_without_its_code(source, ultralytics_pt):
    assert "models" not in sys.modules and "yolov5" not in sys.modules
    ckpt = load_checkpoint(ultralytics_pt)
    assert ckpt["weights_format"] == "ultralytics"
    assert ckpt["epoch"] == 3 and ckpt["updates"] == 120 and ckpt["optimizer"] is None
    assert ckpt["best_fitness"] == pytest.approx([0.42])
    assert ckpt["opt"] == {"epochs": 300, "save_dir": "runs/train/exp"}
    assert ckpt["names"][:2] == ["class0", "class1"] and ckpt["nc"] == 80
    assert ckpt["model_yaml"]["width_multiple"] == 0.25
    state = ckpt["model"]
    assert list(state) == list(source.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert "models" not in sys.modules and "yolov5" not in sys.modules, "loading must not import Ultralytics' packages"


def test_ultralytics_weights_give_the_same_outputs(source, ultralytics_pt, caplog):
    model = DetectionModel("yolov5n", nc=80)
    with caplog.at_level(logging.INFO):
        info = load_pretrained(model, ultralytics_pt, logging.getLogger("test"))
    assert info["loaded"] == info["total"] == 349 and info["skipped"] == []
    assert info["format"] == "ultralytics" and info["names"][79] == "class79"
    strict = DetectionModel("yolov5n", nc=80)
    strict.load_state_dict(load_checkpoint(ultralytics_pt)["model"], strict=True)
    reference = copy.deepcopy(source).half().float()  # the checkpoint stores fp16 weights
    assert torch.allclose(outputs(model), outputs(reference), atol=1e-5)
    assert torch.allclose(outputs(model), outputs(source), atol=0.05, rtol=0.05)
    assert "loaded all 349 tensors" in caplog.text


def test_class_count_mismatch_keeps_fresh_detect_convs(ultralytics_pt, source, caplog):
    torch.manual_seed(5)
    model = DetectionModel("yolov5n", nc=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        info = load_pretrained(model, ultralytics_pt, logging.getLogger("test"))
    head = [f"model.24.m.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert sorted(info["skipped"]) == sorted(head)
    assert info["loaded"] == 343 and info["checkpoint_nc"] == 80
    src = source.state_dict()
    for k, v in model.state_dict().items():
        if k in head:
            assert torch.equal(v, fresh[k])
        else:
            assert torch.allclose(v.float(), src[k].half().float())
    assert "loaded 343/349 tensors" in caplog.text and "model.24.m.0.weight" in caplog.text
    assert "80 classes" in caplog.text and "the model 3" in caplog.text


def test_our_checkpoint_loads_weights_only_and_prefers_ema(tmp_path):
    torch.manual_seed(1)
    trained = DetectionModel("yolov5n", nc=3)
    ema = DetectionModel("yolov5n", nc=3)
    path = tmp_path / "best.pt"
    torch.save({"format": "finetune/1", "epoch": 4, "nc": 3, "names": ["a", "b", "c"],
                "model_yaml": trained.yaml, "model": trained.state_dict(),
                "ema": ema.state_dict(), "metrics": {"map50": 0.5}}, path)
    torch.load(path, weights_only=True)  # the format really is weights-only
    ckpt = load_checkpoint(path)
    assert "weights_format" not in ckpt and ckpt["metrics"] == {"map50": 0.5}
    model = DetectionModel("yolov5n", nc=3)
    info = load_pretrained(model, path)
    assert info["source"] == "ema" and info["names"] == ["a", "b", "c"] and info["skipped"] == []
    assert torch.allclose(outputs(model), outputs(ema))
    torch.save(trained.state_dict(), tmp_path / "bare.pt")
    assert load_pretrained(model, tmp_path / "bare.pt")["source"] == "state_dict"


def test_wrong_architecture_names_the_weights_model(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"model": DetectionModel("yolov5s", nc=3).state_dict()}, path)
    with pytest.raises(FinetuneError, match=r"look like yolov5s; pass --model yolov5s") as e:
        load_pretrained(DetectionModel("yolov5n", nc=3), path)
    assert "model.0.conv.weight has shape (32, 3, 6, 6)" in str(e.value)
    torch.save({"model": {"model.0.conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(FinetuneError, match="missing from the weights"):
        load_pretrained(DetectionModel("yolov5n", nc=3), path)


class _RunsCode:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("where", ["top", "nested", "inside_model"])
@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "subprocess.call"])
def test_code_running_pickles_are_refused(tmp_path, where, how, source):
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "builtins.eval": _RunsCode(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _RunsCode(subprocess.call, ["touch", str(marker)]),
    }[how]
    path = tmp_path / "evil.pt"
    if where == "inside_model":
        save_as_ultralytics(source, path, plant=payload)
    else:
        torch.save({"model": payload} if where == "top" else {"epoch": 1, "opt": {"x": [payload]}}, path)
    with pytest.raises(FinetuneError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "refused" in str(e.value)
    forbidden = {"os.system": ("posix.system", "os.system"), "builtins.eval": ("builtins.eval",),
                 "subprocess.call": ("subprocess.call",)}[how]
    assert any(name in str(e.value) for name in forbidden)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_unreadable_files_are_user_errors(tmp_path, ultralytics_pt):
    with pytest.raises(FinetuneError, match="not found; check the --weights path"):
        load_checkpoint(tmp_path / "missing.pt")
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FinetuneError, match="not a readable PyTorch checkpoint"):
        load_pretrained(DetectionModel("yolov5n"), rnd)
    data = ultralytics_pt.read_bytes()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FinetuneError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(cut)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(FinetuneError, match="not a checkpoint dict"):
        load_checkpoint(tensor_only)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(FinetuneError, match="no model weights"):
        load_pretrained(DetectionModel("yolov5n"), empty)
    scripted = tmp_path / "scripted.pt"
    torch.jit.trace(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2)).save(str(scripted))
    with pytest.raises(FinetuneError, match="TorchScript"):
        load_checkpoint(scripted)
