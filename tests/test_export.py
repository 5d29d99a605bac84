"""`transferkit export`: ONNX, TorchScript and torch.export files that reproduce the PyTorch model
(checked on real validation images), for timm and torchvision backbones, several tasks and an
auxiliary head; and clear errors for broken or mismatched run folders and files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT

import transferkit
from transferkit.cli import main
from transferkit.core.image_files import open_image
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.inference.onnx_run import METADATA_KEY
from transferkit.recipes import load_recipe
from transferkit.rundir.folder import RunDir
from transferkit.runs.export import _Outputs, check_parity, export_run

TINY = ["train.epochs=1", "data.max_samples=32", "train.batch_size=16"]


def _train(workdir, recipe, overrides, name):
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return train(load_recipe(recipe, overrides), output=str(workdir / "export" / name))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def torchvision_run(workdir):
    """torchvision's resnet18 from random weights at 32 px: a torchvision backbone."""
    recipe = ROOT / "recipes/digits_source.yaml"
    return _train(workdir, recipe, [*TINY, "model.backbone=torchvision:resnet18"], "tv")


@pytest.fixture(scope="module")
def aux_run(workdir, source_run):
    """Three tasks and an auxiliary digit head on layer2."""
    recipe = ROOT / "recipes/digits_transfer.yaml"
    aux = ["model.aux_heads=[{task: digit, group: layer2}]", f"model.weights={source_run}"]
    return _train(workdir, recipe, [*TINY, *aux], "aux")


def _images(workdir, count=5):
    return sorted((workdir / "data/digits/transfer/images").iterdir())[:count]


def test_multitask_timm_run_exports_to_onnx_and_predicts_the_same(
    multitask_run, workdir, monkeypatch, capsys
):
    monkeypatch.chdir(workdir)  # the run's data paths are relative to where it was trained
    assert main(["export", str(multitask_run)]) == 0
    out = capsys.readouterr().out
    path = multitask_run / "model.onnx"
    assert f"wrote {path}" in out and "parity on 8 images" in out
    for task in ("digit", "parity", "ink"):
        diff = float(out.split(f"  {task}")[1].split()[0])
        assert diff <= 1e-3
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["digit", "parity", "ink"]
    info = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    assert info["preprocessing"]["size"] == 32 and info["batch_size"] is None  # any batch
    assert [t["name"] for t in info["tasks"]] == ["digit", "parity", "ink"]
    assert info["tasks"][1]["class_names"] == ["even", "odd"]

    images = _images(workdir)
    loaded = transferkit.load(path)
    assert loaded.session.get_inputs()[0].shape[0] == "batch"
    _assert_same_predictions(
        loaded.predict(images), transferkit.load(multitask_run).predict(images)
    )

    # --static-batch: a graph for one image, which predict feeds one image at a time.
    static = multitask_run / "static.onnx"
    assert main(["export", str(multitask_run), "--static-batch", "--output", str(static)]) == 0
    loaded = transferkit.load(static)
    assert loaded.info["batch_size"] == 1 and loaded.session.get_inputs()[0].shape[0] == 1
    _assert_same_predictions(
        loaded.predict(images), transferkit.load(multitask_run).predict(images)
    )
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: the two ask for opposite graphs
        main(["export", str(multitask_run), "--static-batch", "--dynamic-batch"])
    assert "not allowed with argument" in capsys.readouterr().err


def _assert_same_predictions(exported: list[dict], reference: list[dict]) -> None:
    assert len(exported) == len(reference) == 5
    for got, want in zip(exported, reference):
        assert got["digit"]["label"] == want["digit"]["label"]
        assert got["parity"]["label"] == want["parity"]["label"]
        assert got["digit"]["score"] == pytest.approx(want["digit"]["score"], abs=2e-4)
        assert got["ink"]["value"] == pytest.approx(want["ink"]["value"], abs=2e-4)


def test_torchvision_backbone_exports_with_a_dynamic_batch(torchvision_run, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    output = workdir / "export" / "tv.onnx"
    result = export_run(torchvision_run, "onnx", output=output, dynamic_batch=True, opset=18)
    assert result.images == 8 and set(result.parity) == {"digit"}
    assert result.parity["digit"] <= 1e-3
    import onnx

    opsets = {o.domain: o.version for o in onnx.load(str(output)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 18 and result.info["opset"] == 18
    run = transferkit.load(output)
    assert run.info["opset"] == 18
    assert run.session.get_inputs()[0].shape[0] == "batch"
    batch = np.stack([run.transform(open_image(p)) for p in _images(workdir)])
    raw = run.outputs(batch)  # five images in one call
    with torch.no_grad():
        want = transferkit.load(torchvision_run).model(torch.from_numpy(batch))["digit"].numpy()
    assert raw["digit"].shape == (5, 5) and np.abs(raw["digit"] - want).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_export_with_metadata_beside(fmt, multitask_run, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    suffix = ".pt2" if fmt == "exported-program" else ".pt"
    output = workdir / "export" / f"multitask{suffix}"
    result = export_run(multitask_run, fmt, output=output, dynamic_batch=True)
    assert set(result.parity) == {"digit", "parity", "ink"}
    assert max(result.parity.values()) <= 1e-3
    info = json.loads((output.parent / (output.name + ".json")).read_text())
    assert info["format"] == fmt and info["outputs"] == ["digit", "parity", "ink"]
    assert info["batch_size"] is None


def test_auxiliary_heads_are_left_out_unless_asked_for(aux_run, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    default = export_run(aux_run, "onnx", output=workdir / "export" / "aux_default.onnx")
    assert list(default.parity) == ["digit", "parity", "ink"]
    names = [o.name for o in onnx.load(str(default.path)).graph.output]
    assert names == ["digit", "parity", "ink"]
    # Without the auxiliary head, the graph does not compute it: fewer nodes than with it.
    with_aux = export_run(aux_run, "onnx", output=workdir / "export" / "aux.onnx", include_aux=True)
    assert list(with_aux.parity) == ["digit", "parity", "ink", "digit@layer2"]
    assert max(with_aux.parity.values()) <= 1e-3
    graph = onnx.load(str(with_aux.path)).graph
    assert [o.name for o in graph.output][-1] == "digit@layer2"
    assert len(graph.node) > len(onnx.load(str(default.path)).graph.node)
    # An exported file with the auxiliary output still predicts the tasks only.
    predicted = transferkit.load(with_aux.path).predict(_images(workdir, 2))
    assert set(predicted[0]) == {"image", "digit", "parity", "ink"}


def test_parity_check_sees_a_model_that_differs(multitask_run, aux_run, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    result = export_run(multitask_run, "onnx", output=workdir / "export" / "mt.onnx")
    other = transferkit.load(aux_run)  # same tasks, other weights
    module = _Outputs(other.model, ["digit", "parity", "ink"], False).eval()
    pictures = [open_image(p) for p in _images(workdir)]
    diffs = check_parity(result.path, "onnx", other, module, pictures, False)
    assert set(diffs) == {"digit", "parity", "ink"} and max(diffs.values()) > 1e-2


def test_a_failed_parity_check_removes_the_file(multitask_run, workdir, monkeypatch):
    import transferkit.runs.export as export

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(export, "check_parity", lambda *a: {"digit": 0.5, "parity": 0.0})
    output = workdir / "export" / "bad.onnx"
    with pytest.raises(UserError, match=r"parity check failed.*digit 0\.5 \(tolerance 0\.001\)"):
        export_run(multitask_run, "onnx", output=output, parity_images=2)
    assert not output.exists()


def test_broken_or_mismatched_run_folders_give_clear_errors(
    multitask_run, source_run, workdir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(workdir)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty)]) == 2
    assert "has no model" in capsys.readouterr().err

    mismatched = tmp_path / "mismatched"  # model.json of another run beside these weights
    shutil.copytree(multitask_run, mismatched, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(source_run / "model.json", mismatched / "model.json")
    with pytest.raises(UserError, match="does not match"):
        export_run(mismatched)

    truncated = tmp_path / "truncated"
    shutil.copytree(multitask_run, truncated, ignore=shutil.ignore_patterns("checkpoints"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors"):
        export_run(truncated)

    with pytest.raises(UserError, match="must end in .onnx"):
        export_run(multitask_run, "onnx", output=tmp_path / "model.bin")
    with pytest.raises(UserError, match="--opset applies to --format onnx only"):
        export_run(multitask_run, "torchscript", opset=17)
    # The exporter cannot take this model below opset 18: refused, not written at 18 anyway.
    with pytest.raises(UserError, match="--opset 14: .* wrote opset 18"):
        export_run(multitask_run, "onnx", output=tmp_path / "old.onnx", opset=14)
    assert not (tmp_path / "old.onnx").exists()

    # From another directory, the run's relative data paths resolve where it was trained.
    monkeypatch.chdir(tmp_path)
    assert export_run(multitask_run, "onnx", output=tmp_path / "x.onnx").images > 0
    moved = tmp_path / "moved"  # a copy on a machine that has not got its data
    shutil.copytree(multitask_run, moved, ignore=shutil.ignore_patterns("checkpoints"))
    RunDir(moved).write_origin()  # "trained" here, in tmp_path, where the data is not
    with pytest.raises(UserError, match="pass --images FOLDER"):
        export_run(moved, "onnx", output=tmp_path / "y.onnx")
    images = workdir / "data/digits/transfer/images"
    result = export_run(moved, "onnx", output=tmp_path / "y.onnx", images=images,
                        parity_images=3)  # fmt: skip
    assert result.images == 3


def test_onnx_files_not_from_transferkit_give_clear_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a valid ONNX model"):
        transferkit.load(garbage)

    plain = tmp_path / "plain.onnx"  # a valid ONNX graph without transferkit's metadata
    torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.randn(1, 3),), str(plain), dynamo=True)
    assert main(["predict", str(plain), str(tmp_path)]) == 2
    assert "not written by `transferkit export`" in capsys.readouterr().err

    assert main(["predict", str(tmp_path / "missing.onnx"), str(tmp_path)]) == 2
    assert "no such ONNX file" in capsys.readouterr().err

    def with_metadata(name: str, info: dict):
        model = onnx.load(str(plain))
        onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(info)})
        onnx.save(model, str(tmp_path / name))
        return tmp_path / name

    info = {"version": 1, "outputs": ["digit"], "preprocessing": {},
            "tasks": [{"name": "digit", "kind": "multiclass", "num_outputs": 2}]}  # fmt: skip
    with pytest.raises(UserError, match="the graph .* does not match"):
        transferkit.load(with_metadata("mismatched.onnx", info))  # its output is not "digit"
    with pytest.raises(UserError, match="exported by a newer transferkit .*upgrade"):
        transferkit.load(with_metadata("newer.onnx", {**info, "version": 99}))
