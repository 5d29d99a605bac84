"""Distillation: the loss per task kind, the teacher's view of the student's batch, outputs
precomputed by row, unlabelled images, and the errors a user can meet. (Exact resume of a
distilled run: tests/test_reliability.py; the measured student: docs/distillation.md.)"""

from __future__ import annotations

import pytest
import torch
from conftest import QUICK, ROOT

from transferkit.cli import main
from transferkit.core import DataConfig, TaskSpec
from transferkit.engine.distill import Distiller, build_distiller, distill_loss
from transferkit.errors import UserError
from transferkit.recipes import DistillSection, load_recipe

KINDS = {
    "multiclass": TaskSpec("digit", "multiclass", 5, tuple("abcde")),
    "binary": TaskSpec("odd", "binary", 1, ("even", "odd")),
    "multilabel": TaskSpec("tags", "multilabel", 3, ("x", "y", "z")),
    "regression": TaskSpec("ink", "regression", 1, target_mean=(10.0,), target_std=(4.0,)),
}


def _outputs(task: TaskSpec, seed: int) -> torch.Tensor:
    shape = (8,) if task.num_outputs == 1 and task.kind != "multiclass" else (8, task.num_outputs)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_loss_is_zero_at_the_teacher_and_pulls_towards_it(kind):
    task = KINDS[kind]
    teacher, student = _outputs(task, 0), _outputs(task, 1).requires_grad_(True)
    assert distill_loss(task, teacher, teacher, 2.0).abs() < 1e-6
    loss = distill_loss(task, student, teacher, 2.0)
    assert loss > 0
    loss.backward()
    with torch.no_grad():  # a small step against the gradient moves the student closer
        assert distill_loss(task, student - 0.05 * student.grad, teacher, 2.0) < loss


def test_soft_targets_are_hintons_kl_times_t_squared():
    task, t = KINDS["multiclass"], 3.0
    student, teacher = _outputs(task, 1), _outputs(task, 2)
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert distill_loss(task, student, teacher, t) == pytest.approx(float(expected), rel=1e-5)
    ink = KINDS["regression"]  # in standard units, as the label loss is
    a, b = torch.tensor([10.0, 14.0]), torch.tensor([14.0, 14.0])
    assert distill_loss(ink, a, b, t) == pytest.approx(0.5)


def test_the_teacher_sees_the_batch_in_its_own_normalization_and_size():
    student = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    info = type("Info", (), {})()
    info.data_config = DataConfig(input_size=(3, 48, 48), mean=(0.485, 0.456, 0.406),
                                  std=(0.229, 0.224, 0.225))  # fmt: skip
    info.image_size = None
    distiller = Distiller(torch.nn.Identity(), info, {}, DistillSection(teacher="x"), student,
                          torch.device("cpu"))  # fmt: skip
    images = torch.rand(2, 3, 32, 32)
    view = distiller._teacher_view(images)
    assert view.shape == (2, 3, 48, 48)
    pixels = images * 0.25 + 0.5
    mean, std = torch.tensor(info.data_config.mean), torch.tensor(info.data_config.std)
    want = torch.nn.functional.interpolate(
        (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), size=(48, 48), mode="bilinear"
    )
    assert torch.allclose(view, want, atol=1e-6)


def test_precomputed_outputs_are_the_teachers_on_each_row(source_run, workdir, monkeypatch):
    import transferkit as tk
    from transferkit.data import load_data

    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", QUICK)
    data = load_data(recipe.data, recipe.tasks, recipe.seed)
    tasks = {t.name: t for t in data.tasks}
    distiller = build_distiller(DistillSection(teacher=str(source_run)), tasks,
                                DataConfig(input_size=(3, 32, 32)), torch.device("cpu"))  # fmt: skip
    distiller.precompute(data.splits["train"], batch_size=16)
    run = tk.load(source_run)
    rows = [0, 5, len(data.splits["train"]) - 1]
    images = torch.stack([run.transform(data.splits["train"][r]["image"]) for r in rows])
    with torch.no_grad():
        want = run.model(images)["digit"]
    got = distiller.teacher_outputs({"index": torch.tensor(rows)})["digit"]
    assert torch.allclose(got, want, atol=1e-5)


def test_unlabelled_images_join_the_training_rows_without_labels(workdir, tmp_path, monkeypatch):
    import shutil

    from transferkit.data import load_data

    monkeypatch.chdir(workdir)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for path in sorted((workdir / "data/digits/transfer/images").iterdir())[:7]:
        shutil.copy(path, folder / path.name)
    base = load_recipe(ROOT / "recipes/digits_source.yaml", QUICK)
    plain = load_data(base.data, base.tasks, base.seed)
    manifest = tmp_path / "unlabelled.csv"
    # paths relative to the manifest, in the recipe's image column
    manifest.write_text("image\n" + "".join(f"unlabelled/{p.name}\n" for p in folder.iterdir()))
    for source in (folder, manifest):
        extra = [f"data.unlabeled={source}", "distill.teacher=somewhere"]
        recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, *extra])
        data = load_data(recipe.data, recipe.tasks, recipe.seed)
        train, before = data.splits["train"], len(plain.splits["train"])
        assert len(train) == before + 7
        assert train["digit"][before:] == [None] * 7 and None not in train["digit"][:before]
        assert len(data.splits["validation"]) == len(plain.splits["validation"])
        assert train[before + 6]["image"].size[0] > 0  # decodable


def test_what_a_user_can_get_wrong_is_one_error(source_run, workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    transfer = ["train", "digits_transfer", "--set", "data.max_samples=48"]
    assert main([*transfer, "--teacher", str(source_run), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "distill.teacher: task 'digit'" in err and "is not the teacher's" in err
    assert main([*transfer, "--teacher", str(tmp_path), "--output", str(tmp_path / "y")]) == 2
    assert "has no saved model" in capsys.readouterr().err
    with pytest.raises(UserError, match="data.unlabeled: images without labels teach only"):
        load_recipe(ROOT / "recipes/digits_source.yaml", ["data.unlabeled=somewhere"])
    with pytest.raises(UserError, match="distill.alpha"):
        load_recipe(ROOT / "recipes/digits_source.yaml",
                    ["distill.teacher=x", "distill.alpha=1.5"])  # fmt: skip
