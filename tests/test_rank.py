"""Transferability scores (`transferkit.select.scores`) against hand computations, and `transferkit
rank` on timm's tiny test models through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT

from transferkit.cli import main
from transferkit.errors import UserError
from transferkit.select.scores import evidence, knn_score, logme, logme_column

TINY = ["data.max_samples=40", "data.image_size=32"]


def _exact_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F^T/alpha) per sample: the marginal likelihood by definition."""
    n = len(y)
    cov = torch.tensor(np.eye(n) / beta + f @ f.T / alpha)
    normal = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    return float(normal.log_prob(torch.tensor(y))) / n


@pytest.mark.parametrize(("n", "d"), [(40, 6), (12, 30)])  # more samples than dims, and fewer
def test_logme_is_the_marginal_likelihood_at_its_maximum(n, d):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, d))
    y = f @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    value, alpha, beta = logme_column(u, s**2, y, d)
    # (With fewer samples than dims, y is fitted almost exactly, beta is ~1e6 and the dense
    # covariance is ill-conditioned: agreement to 1e-7 is what float64 gives there.)
    assert value == pytest.approx(_exact_log_evidence(f, y, alpha, beta), rel=1e-7)
    assert logme(f, y[:, None]) == pytest.approx(value)
    if n > d:  # an interior maximum: moving alpha or beta lowers the evidence
        x2 = (u.T @ y) ** 2
        residual = float(y @ y - x2.sum())
        for da, db in [(1.2, 1), (0.8, 1), (1, 1.2), (1, 0.8)]:
            moved = evidence(s**2, x2, residual, n, d, alpha * da, beta * db)[0]
            assert moved < value


def test_logme_averages_one_hot_columns_and_prefers_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    onehot = np.eye(3)[labels]
    separable = np.hstack([3 * onehot + 0.3 * rng.normal(size=(120, 3)), rng.normal(size=(120, 5))])
    noise = rng.normal(size=(120, 8))
    u, s, _ = np.linalg.svd(separable, full_matrices=False)
    per_column = [logme_column(u, s**2, onehot[:, k], 8)[0] for k in range(3)]
    assert logme(separable, onehot) == pytest.approx(np.mean(per_column))
    assert logme(separable, onehot) > logme(noise, onehot) + 0.5


def test_knn_score_leaves_each_sample_out():
    # Two tight clusters of four; each point's 3 nearest other points are its cluster's.
    angles = np.array([0.0, 0.05, 0.1, 0.15, 1.4, 1.45, 1.5, 1.55])
    f = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert knn_score(f, np.eye(2)[labels], "multiclass", k=3) == 1.0
    # One point of class 1 in cluster 0: without itself, its neighbours vote 0 (wrong); the
    # other three of its cluster still win their votes 2 to 1.
    odd = labels.copy()
    odd[0] = 1
    assert knn_score(f, np.eye(2)[odd], "multiclass", k=3) == pytest.approx(7 / 8)
    # An exact duplicate with another label: each of the pair gets the other's vote, never
    # its own (whichever of the two the search lists first).
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.01]])
    assert knn_score(dup, np.eye(2)[[0, 1, 1, 1]], "multiclass", k=1) == 0.5
    # Regression: R^2 of the neighbours' mean, near 1 for a smooth target.
    grid = np.linspace(0.1, 1.5, 30)
    circle = np.stack([np.cos(grid), np.sin(grid)], axis=1)
    assert knn_score(circle, grid[:, None], "regression", k=2) > 0.95
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(200, 4))
    chance = knn_score(noise, np.eye(4)[rng.integers(0, 4, 200)], "multiclass")
    assert 0.1 < chance < 0.45


def test_rank_and_interpolate_are_in_the_api():
    import transferkit
    from transferkit.runs import wise_ft
    from transferkit.select import transferability

    assert transferkit.rank is transferability.rank
    assert transferkit.interpolate is wise_ft.interpolate


def test_scores_refuse_bad_input():
    with pytest.raises(UserError, match="NaN"):
        logme(np.full((4, 2), math.nan), np.ones((4, 1)))
    with pytest.raises(UserError, match="at least 2"):
        knn_score(np.ones((1, 2)), np.ones((1, 1)), "binary")


def test_rank_cli_on_tiny_timm_models(workdir, source_run, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(workdir)
    recipe = str(ROOT / "recipes/digits_transfer.yaml")
    args = ["rank", recipe, "--backbones",
            f"timm:test_resnet@none,timm:test_efficientnet@none,timm:test_resnet@{source_run}",
            "--groups", "all", "--output", str(tmp_path)]  # fmt: skip
    for override in TINY:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sorted by digit logme" in out
    report = json.loads((tmp_path / "rank_digits_transfer.json").read_text())
    rows = report["rows"]
    from transferkit.models import create_backbone

    groups = {
        b: len(create_backbone(b).group_names)
        for b in ("timm:test_resnet", "timm:test_efficientnet")
    }
    # One row per group and one for the pooled output, per candidate.
    assert len(rows) == 2 * (groups["timm:test_resnet"] + 1) + groups["timm:test_efficientnet"] + 1
    logmes = [r["scores"]["digit"]["logme"] for r in rows]
    assert logmes == sorted(logmes, reverse=True)
    for row in rows:
        assert set(row["scores"]) == {"digit", "parity", "ink"}  # every task, regression too
        assert all(math.isfinite(v) for s in row["scores"].values() for v in s.values())
        assert 0.0 <= row["scores"]["digit"]["knn"] <= 1.0
    assert (tmp_path / "rank_digits_transfer.png").stat().st_size > 0
    names = {r["name"] for r in rows}
    assert f"timm:test_resnet@{source_run}" in names and "timm:test_resnet@none/layer2" in names


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backbones", "resnet18"], "SOURCE:NAME"),
        (["--backbones", "timm:test_resnet@nowhere/model.pth"], "neither pretrained"),
        (["--backbones", "timm:test_resnet@none", "--groups", "layer9"], "unknown layer group"),
    ],
)
def test_rank_bad_input_is_one_line(workdir, extra, message, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    recipe = str(ROOT / "recipes/digits_source.yaml")
    assert main(["rank", recipe, *extra, "--set", "data.max_samples=16"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1  # no progress bar started


def test_rank_reads_the_shared_feature_cache_a_probe_uses(
    workdir, source_run, monkeypatch, tmp_path
):
    from transferkit.models import Backbone
    from transferkit.select.transferability import rank

    monkeypatch.chdir(workdir)
    recipe = str(ROOT / "recipes/digits_transfer.yaml")
    overrides = [*TINY, f"train.feature_cache_dir={tmp_path / 'cache'}"]
    candidate = [f"timm:test_resnet@{source_run}"]
    cold = rank(recipe, candidate, overrides=overrides, progress=False)
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1

    def no_backbone(self, images):
        raise AssertionError("a warm cache must not run the backbone")

    monkeypatch.setattr(Backbone, "forward", no_backbone)
    warm = rank(recipe, candidate, overrides=overrides, progress=False)
    assert [r.scores for r in warm] == [r.scores for r in cold]


def test_rank_reads_the_entry_a_probe_built(workdir, monkeypatch, tmp_path):
    """A probe of ImageNet EfficientNet-Lite0 at the recipe's data.image_size builds the cache
    entry that ranking the same backbone on the same data then reads, with no backbone pass
    (the key includes the image size: rank keyed the weights' own 224 px and missed)."""
    from transferkit.engine import train
    from transferkit.models import Backbone
    from transferkit.recipes import load_recipe
    from transferkit.select.transferability import rank

    monkeypatch.chdir(workdir)
    recipe = str(ROOT / "recipes/digits_imagenet.yaml")
    cache = tmp_path / "cache"
    overrides = ["data.path=data/digits/transfer/manifest.csv", *TINY,
                 f"train.feature_cache_dir={cache}"]  # fmt: skip
    probe = [*overrides, "train.epochs=1"]  # phase 0: a linear probe, all frozen
    train(load_recipe(recipe, probe), output=str(tmp_path / "probe"))
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(entries) == 2  # the train and validation splits

    def no_backbone(self, images):
        raise AssertionError("the probe's entry must serve the ranking")

    monkeypatch.setattr(Backbone, "forward", no_backbone)
    rows = rank(recipe, overrides=overrides, progress=False)
    assert rows and sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == entries
