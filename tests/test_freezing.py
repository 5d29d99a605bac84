"""Freezing across the model registry: frozen means bit-identical, trainable means it moved.

For each backbone: freeze up to each group in turn, attach two heads, take one optimizer step
in `.train()` mode, and compare every parameter and buffer with its value before the step.
The CI set covers every torchvision family and a small model of each major timm family; the
`zoo` marker (`make test-zoo`) runs every torchvision classification model and more of timm.
"""

from __future__ import annotations

import pytest
import torch
from conftest import one_step, snapshot

from transferkit.models import MultiTaskModel, TaskSpec, create_backbone
from transferkit.models.torchvision_adapter import FAMILY_RULES, list_models

# (backbone, image size or None for the data config's size, constructor kwargs)
TORCHVISION_CI = [
    ("torchvision:resnet18", 32, {}),
    ("torchvision:regnet_x_400mf", 32, {}),
    ("torchvision:shufflenet_v2_x0_5", 32, {}),
    ("torchvision:googlenet", 64, {}),
    ("torchvision:inception_v3", 80, {}),  # its stem needs at least 75 px
    ("torchvision:densenet121", 32, {}),
    ("torchvision:vgg11", 32, {}),
    ("torchvision:alexnet", 64, {}),
    ("torchvision:squeezenet1_1", 32, {}),
    ("torchvision:efficientnet_b0", 32, {}),
    ("torchvision:mobilenet_v2", 32, {}),
    ("torchvision:mobilenet_v3_small", 32, {}),
    ("torchvision:mnasnet0_5", 32, {}),
    ("torchvision:convnext_tiny", 32, {}),
    ("torchvision:swin_t", 32, {}),
    ("torchvision:vit_b_16", 32, {"image_size": 32}),
    ("torchvision:maxvit_t", 224, {}),  # window partitions need 224 px
]
TIMM_TEST_MODELS = [
    "test_byobnet", "test_coatnet", "test_convnext", "test_convnext2", "test_convnext3",
    "test_efficientnet", "test_efficientnet_evos", "test_efficientnet_gn", "test_efficientnet_ln",
    "test_mambaout", "test_maxvit", "test_nfnet", "test_resnet", "test_vit", "test_vit2",
    "test_vit3", "test_vit4", "test_vit_relpos",
]  # fmt: skip
TIMM_CI = [(f"timm:{name}", None, {}) for name in TIMM_TEST_MODELS] + [
    ("timm:resnet18", 32, {}),
    ("timm:efficientnet_b0", 32, {}),
    ("timm:mobilenetv3_small_050", 32, {}),
    ("timm:convnext_atto", 32, {}),
    ("timm:vit_tiny_patch16_224", 32, {"img_size": 32}),
    ("timm:deit_tiny_patch16_224", 32, {"img_size": 32}),
    ("timm:swin_tiny_patch4_window7_224", 64, {"img_size": 64, "window_size": 2}),
    ("timm:regnetx_002", 32, {}),
    ("timm:densenet121", 32, {}),
    ("timm:ghostnet_050", 32, {}),
    ("timm:edgenext_xx_small", 64, {}),
    ("timm:mobilevit_xxs", 64, {}),
    ("timm:efficientvit_b0", 64, {}),
    ("timm:levit_128s", 224, {}),
    ("timm:poolformer_s12", 32, {}),
    ("timm:eva02_tiny_patch14_224", 28, {"img_size": 28}),
]
TIMM_ZOO = [
    ("timm:vgg11", 32, {}),
    ("timm:inception_v3", 80, {}),
    ("timm:xception41", 64, {}),
    ("timm:hrnet_w18_small", 64, {}),
    ("timm:dla34", 32, {}),
    ("timm:cspresnet50", 32, {}),
    ("timm:fastvit_t8", 64, {}),
    ("timm:rexnet_100", 32, {}),
    ("timm:mixnet_s", 32, {}),
    ("timm:beit_base_patch16_224", 32, {"img_size": 32}),
]


def _zoo_case(name: str) -> tuple[str, int, dict]:
    if name.startswith("vit_"):
        patch = int(name.split("_")[-1])
        return f"torchvision:{name}", 2 * patch, {"image_size": 2 * patch}
    size = {"inception_v3": 80, "maxvit_t": 224}.get(name, 64)
    return f"torchvision:{name}", size, {}


TORCHVISION_ZOO = [_zoo_case(name) for name in list_models()]


def check_freeze_sweep(spec: str, size: int | None, kwargs: dict) -> None:
    backbone = create_backbone(spec, **kwargs)
    size = size or backbone.data_config.input_size[1]
    model = MultiTaskModel(
        backbone, [TaskSpec("kind", "multiclass", 3), TaskSpec("score", "regression")]
    )
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, size, size)).shape == (2, backbone.num_features)
    names = backbone.group_names
    assert len(names) >= 2 and len(set(names)) == len(names)
    initial = snapshot(model)
    for depth in range(len(names)):
        model.load_state_dict(initial)
        spec_text = f"up_to:{depth}"
        backbone.freeze(spec_text)
        before = snapshot(backbone.model)
        heads_before = snapshot(model.heads)
        one_step(model, size)
        after = backbone.model.state_dict()
        moved_groups = set()
        for tensor, value in before.items():
            group_index = names.index(backbone.group_of(tensor))
            if group_index <= depth:
                assert torch.equal(value, after[tensor]), (
                    f"{spec} {spec_text}: frozen {tensor} changed"
                )
            elif not torch.equal(value, after[tensor]):
                moved_groups.add(group_index)
        expected = set(range(depth + 1, len(names)))
        assert moved_groups == expected, (
            f"{spec} {spec_text}: trainable groups that did not train: {expected - moved_groups}"
        )
        heads_after = model.heads.state_dict()
        assert all(not torch.equal(v, heads_after[k]) for k, v in heads_before.items())


@pytest.mark.parametrize(
    ("spec", "size", "kwargs"),
    TORCHVISION_CI + TIMM_CI,
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_freeze_up_to_each_group(spec, size, kwargs):
    check_freeze_sweep(spec, size, kwargs)


@pytest.mark.zoo
@pytest.mark.parametrize(
    ("spec", "size", "kwargs"),
    TORCHVISION_ZOO + TIMM_ZOO,
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_freeze_up_to_each_group_zoo(spec, size, kwargs):
    check_freeze_sweep(spec, size, kwargs)


def test_ci_set_covers_every_torchvision_family():
    families = {
        type(create_backbone(spec, device="meta").model).__name__ for spec, _, _ in TORCHVISION_CI
    }
    assert families == set(FAMILY_RULES)


@pytest.mark.parametrize("name", list_models())
def test_every_torchvision_model_has_complete_groups(name):
    """Every tensor of every torchvision classifier is in exactly one group, by a family rule."""
    backbone = create_backbone(f"torchvision:{name}", device="meta")
    assert type(backbone.model).__name__ in FAMILY_RULES
    grouped = [t for g in backbone.groups for t in g.tensors]
    assert sorted(grouped) == sorted(backbone.model.state_dict(keep_vars=True))
    assert len(backbone.groups) >= 4
    assert backbone.groups[0].name == "stem"
    modules = dict(backbone.model.named_modules())
    assert all(g.output_module in modules for g in backbone.groups)
    assert sum(g.num_params for g in backbone.groups) == sum(
        p.numel() for p in backbone.parameters()
    )


@pytest.mark.parametrize("spec", ["timm:test_resnet", "torchvision:resnet18"])
@pytest.mark.parametrize("policy", ["frozen", "stats_frozen", "train"])
def test_norm_policy_in_frozen_groups(spec, policy):
    backbone = create_backbone(spec)
    model = MultiTaskModel(backbone, [TaskSpec("kind", "multiclass", 3)])
    backbone.freeze(f"all@norm={policy}")
    model.train()  # a later .train() must not undo the policy
    before = snapshot(backbone.model)
    one_step(model, 32)
    after = backbone.model.state_dict()
    bns = [n for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        stats_moved = not torch.equal(before[f"{bn}.running_mean"], after[f"{bn}.running_mean"])
        affine_moved = not torch.equal(before[f"{bn}.weight"], after[f"{bn}.weight"])
        assert stats_moved == (policy == "train"), bn
        assert affine_moved == (policy != "frozen"), bn
    convs = [n for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.equal(before[f"{c}.weight"], after[f"{c}.weight"]) for c in convs)


def test_freeze_specs_select_groups():
    backbone = create_backbone("timm:test_resnet")
    assert backbone.group_names == ["stem", "layer1", "layer2", "layer3", "layer4"]

    def trainable(spec):
        backbone.freeze(spec)
        return [g["name"] for g in backbone.group_summary() if g["trainable"]]

    assert trainable("none") == backbone.group_names
    assert trainable("all") == []
    assert trainable("up_to:layer2") == ["layer3", "layer4"]
    assert trainable("up_to:-2") == ["layer4"]
    assert trainable("train:stem,layer4") == ["stem", "layer4"]
    assert trainable(r"regex:^layer4\.0\.conv1") == ["layer4"]
    trainable_params = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert trainable_params == ["layer4.0.conv1.weight"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("up_to:layer9", "unknown layer group 'layer9'"),
        ("up_to:7", "out of range"),
        ("frozen", "unknown freeze mode"),
        ("up_to", "needs a target"),
        ("all@norm=maybe", "@norm="),
        ("regex:([", "bad regex"),
        ("all:layer1", "takes no target"),
    ],
)
def test_bad_freeze_specs_are_clear_errors(text, message):
    from transferkit.errors import UserError

    backbone = create_backbone("timm:test_resnet", device="meta")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        backbone.freeze(text)
