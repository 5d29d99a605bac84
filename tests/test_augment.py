"""`data.augment`: the presets as timm settings, timm's policy strings, random erasing and the
crop's area range, built by timm's create_transform; each sample's augmentation depends on its
position only; `horizontal_flip: false` holds for every policy; runs made before keep theirs."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch
from conftest import QUICK, ROOT
from PIL import Image
from torchvision import transforms as v1

from transferkit.core import DataConfig
from transferkit.data import build_transforms
from transferkit.errors import UserError
from transferkit.recipes import load_recipe

CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    interpolation="bilinear", crop_pct=1.0)  # fmt: skip
POLICIES = ["light", "strong", "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original", "v0", "3a",
            "trivialaugment"]  # fmt: skip


def _image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _steps(transform) -> list:
    return list(getattr(transform, "transforms", [transform]))


def _op_names(transform) -> list[str]:
    """The names of the ops timm's policies choose from (RandAugment, AugMix, AutoAugment)."""
    names = []
    for step in _steps(transform):
        ops = list(getattr(step, "ops", []))
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
        names += [op.name for op in ops]
    return names


@pytest.mark.parametrize("augment", POLICIES)
def test_every_policy_builds_with_timm_and_keeps_the_flip_off_when_asked(augment):
    image = _image()
    for hflip in (True, False):
        transform = build_transforms(CONFIG, True, augment, 32, hflip=hflip)
        assert type(transform).__module__.startswith("torchvision")  # timm composes v1 steps
        flips = [s for s in _steps(transform) if isinstance(s, v1.RandomHorizontalFlip)]
        assert bool(flips) == hflip
        assert not [n for n in _op_names(transform) if "flip" in n.lower()]  # no policy mirrors
        assert augment in ("light",) or _op_names(transform)  # the policy is really there
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("augment", ["strong", "trivialaugment", "augmix-m5-w4-d2"])
def test_a_policy_survives_its_strongest_draws(augment):
    """timm's top RandAugment magnitude posterizes to 0 bits, which Pillow refuses: across many
    seeded draws (some reach it) every image comes out."""
    transform = build_transforms(CONFIG, True, augment, 32)
    image = _image()
    for seed in range(1500):
        random.seed(seed)
        np.random.seed(seed)
        assert transform(image).shape == (3, 32, 32)


def test_the_presets_are_names_for_timm_settings():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    light = _steps(build_transforms(CONFIG, True, "light", 32))
    strong = _steps(build_transforms(CONFIG, True, "strong", 32))
    crop = next(s for s in light if isinstance(s, RandomResizedCropAndInterpolation))
    assert crop.scale == (0.6, 1.0)
    assert not any(isinstance(s, (RandAugment, RandomErasing)) for s in light)
    assert not any(isinstance(s, v1.ColorJitter) for s in light)
    (erasing,) = [s for s in strong if isinstance(s, RandomErasing)]
    assert erasing.probability == 0.25 and any(isinstance(s, RandAugment) for s in strong)
    custom = _steps(build_transforms(CONFIG, True, "light", 32, random_erasing=0.5,
                                     scale=[0.3, 0.9]))  # fmt: skip
    assert next(s for s in custom if isinstance(s, RandomErasing)).probability == 0.5
    assert next(s for s in custom if isinstance(s, RandomResizedCropAndInterpolation)).scale == (
        0.3, 0.9,
    )  # fmt: skip


def test_a_sample_is_augmented_by_its_position_only_and_the_global_rngs_are_kept(workdir):
    """The same (epoch, row) gives the same tensor whatever was drawn before; another epoch
    gives another; Python's and NumPy's RNGs are as they were after each sample."""
    import datasets

    from transferkit.data import TaskImageDataset

    images = [str(p) for p in sorted((workdir / "data/digits/source/images").iterdir())[:4]]
    rows = datasets.Dataset.from_dict({"image": images})
    transform = build_transforms(CONFIG, True, "rand-m9-mstd0.5-inc1", 32, random_erasing=0.5)
    dataset = TaskImageDataset(rows, [], transform, seed=7)
    random.seed(1)
    np.random.seed(1)
    python, numpy_state = random.getstate(), np.random.get_state()
    first = dataset[2]["image"]
    assert random.getstate() == python
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    _ = [dataset[i]["image"] for i in (0, 1, 3)]
    assert torch.equal(dataset[2]["image"], first)
    dataset.epoch = 1
    assert not torch.equal(dataset[2]["image"], first)


def test_persistent_loader_workers_augment_each_epoch_by_its_own_seed(workdir):
    """The training loader's workers live across epochs; they must still draw each epoch's
    augmentation from (seed, epoch, row), the epoch the trainer set after they started."""
    import datasets

    from transferkit.data import TaskImageDataset
    from transferkit.engine.batches import make_loaders

    images = [str(p) for p in sorted((workdir / "data/digits/source/images").iterdir())[:6]]
    rows = datasets.Dataset.from_dict({"image": images})
    transform = build_transforms(CONFIG, True, "rand-m9-mstd0.5-inc1", 32, random_erasing=0.5)
    dataset = TaskImageDataset(rows, [], transform, seed=7)
    cfg = types.SimpleNamespace(batch_size=3, eval_batch_size=None)
    loader, _ = make_loaders(dataset, dataset, cfg, workers=1)
    assert loader.persistent_workers
    seen = []
    for epoch in (0, 1):
        dataset.epoch = epoch
        for batch in loader:
            for image, row in zip(batch["image"], batch["index"].tolist()):
                assert torch.equal(image, dataset[row]["image"])  # this epoch's draw
                seen.append((epoch, row, image))
    assert len(seen) == 12
    first = {row: image for epoch, row, image in seen if epoch == 0}
    assert not any(torch.equal(first[row], image) for epoch, row, image in seen if epoch == 1)


def test_bad_policies_are_one_recipe_error(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    recipe = ROOT / "recipes/digits_source.yaml"
    with pytest.raises(UserError, match="data.augment: 'rand-x9' is neither a preset"):
        load_recipe(recipe, ["data.augment=rand-x9"])
    with pytest.raises(UserError, match="data.scale: two areas"):
        load_recipe(recipe, ["data.scale=[0.9, 0.2]"])
    with pytest.raises(UserError, match="timm policies need data.augment_library: timm"):
        load_recipe(recipe, ["data.augment=augmix-m5", "data.augment_library=torchvision"])
    assert load_recipe(recipe, [*QUICK, "data.augment=trivialaugment"]).data.augment_library == (
        "timm"
    )


def test_a_run_made_before_timm_built_the_presets_keeps_the_torchvision_ones():
    """The legacy fixture (augment: light, no augment_library) reads as torchvision: its
    resume stays bit-identical (tests/test_legacy_run.py), and its presets are these."""
    from transferkit.rundir import RunDir

    legacy = RunDir(ROOT / "tests/fixtures/legacy_run/run")
    data = legacy.resolved_recipe().recipe.data
    assert data.augment == "light" and data.augment_library == "torchvision"
    transform = build_transforms(CONFIG, True, "light", 32, library="torchvision")
    assert type(transform).__module__ == "torchvision.transforms.v2._container"


@pytest.mark.parametrize("shape", [(37, 53, 3), (64, 64, 3), (300, 200, 3), (40, 30)])
def test_the_eval_transform_is_torchvisions_compose_bit_for_bit(shape):
    """The evaluation (and `augment: none`) transform calls v2's kernels directly, skipping
    v2's per-transform dispatch; it must give what the Compose it replaced gives, and describe
    itself as that Compose (the feature cache keys entries by the text)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2

    from transferkit.core import Preprocessing
    from transferkit.data import build_transforms
    from transferkit.data.transforms import _INTERPOLATIONS
    from transferkit.models import create_backbone

    config = create_backbone("timm:test_resnet", None).data_config
    spec = Preprocessing.from_config(config, 48)
    compose = v2.Compose([
        v2.Resize(spec.resize_to, interpolation=_INTERPOLATIONS[spec.interpolation],
                  antialias=True),
        v2.CenterCrop(spec.size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(config.mean), std=list(config.std)),
    ])  # fmt: skip
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)  # RGB or gray
    image = Image.fromarray(pixels)
    fast = build_transforms(config, False, "none", 48)
    assert torch.equal(fast(image), compose(image).as_subclass(torch.Tensor))
    assert repr(fast) == repr(compose)
