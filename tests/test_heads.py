"""Multi-task heads: every kind's output shape, MLP heads, auxiliary heads on groups."""

from __future__ import annotations

import pytest
import torch

from transferkit.errors import UserError
from transferkit.models import AuxHeadSpec, MultiTaskModel, TaskSpec, create_backbone

TASKS = [
    TaskSpec("digit", "multiclass", 10, class_names=tuple(str(i) for i in range(10))),
    TaskSpec("even", "binary"),
    TaskSpec("tags", "multilabel", 4, hidden=16, dropout=0.2),
    TaskSpec("size", "regression"),
    TaskSpec("box", "regression", 2, hidden=8),
]


def test_output_shapes_for_every_task_kind():
    model = MultiTaskModel(create_backbone("timm:test_resnet"), TASKS)
    outputs = model(torch.randn(3, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "digit": (3, 10),
        "even": (3,),
        "tags": (3, 4),
        "size": (3,),
        "box": (3, 2),
    }
    mlp = model.heads["tags"].net
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Dropout", "Linear"]


@pytest.mark.parametrize(
    ("spec", "kwargs", "size"),
    [
        ("timm:test_resnet", {}, 32),
        ("timm:test_vit", {"img_size": 32}, 32),  # token maps [B, N, C]
        ("timm:swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64),  # NHWC maps
        ("torchvision:swin_t", {}, 64),  # NHWC maps
        ("torchvision:densenet121", {}, 32),
    ],
)
def test_aux_heads_on_intermediate_groups(spec, kwargs, size):
    backbone = create_backbone(spec, **kwargs)
    backbone.data_config = type(backbone.data_config)(input_size=(3, size, size))
    groups = [backbone.group_names[1], backbone.group_names[-2]]
    model = MultiTaskModel(
        backbone,
        TASKS[:2],
        [AuxHeadSpec("digit", g) for g in groups] + [AuxHeadSpec("even", groups[0])],
    )
    outputs = model(torch.randn(2, 3, size, size))
    assert set(outputs) == {
        "digit",
        "even",
        f"digit@{groups[0]}",
        f"digit@{groups[1]}",
        f"even@{groups[0]}",
    }
    assert outputs[f"digit@{groups[1]}"].shape == (2, 10) and outputs[
        f"even@{groups[0]}"
    ].shape == (2,)
    # Deep supervision: an auxiliary loss reaches the backbone groups below it.
    backbone.zero_grad()
    outputs[f"digit@{groups[0]}"].sum().backward()
    first = backbone.groups[0].tensors[0]
    assert dict(backbone.model.named_parameters())[first].grad.abs().sum() > 0
    assert MultiTaskModel.task_of(f"digit@{groups[1]}") == "digit"


def test_building_aux_heads_leaves_batchnorm_statistics_alone():
    backbone = create_backbone("timm:test_resnet")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    MultiTaskModel(backbone, TASKS[:1], [AuxHeadSpec("digit", "layer2")])
    assert all(torch.equal(v, backbone.model.state_dict()[k]) for k, v in before.items())
    assert backbone.training


def test_custom_head_modules_are_accepted():
    backbone = create_backbone("timm:test_resnet")
    model = MultiTaskModel(backbone, {"emb": torch.nn.Linear(backbone.num_features, 5)})
    assert model(torch.randn(2, 3, 32, 32))["emb"].shape == (2, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a", "kind": "ordinal"}, "kind must be one of"),
        ({"name": "a", "kind": "multiclass", "num_outputs": 1}, "at least 2 classes"),
        ({"name": "a", "kind": "binary", "num_outputs": 3}, "one output"),
        ({"name": "a.b", "kind": "binary"}, "no '.'"),
        (
            {"name": "a", "kind": "multiclass", "num_outputs": 3, "class_names": ("x",)},
            "1 class names for 3",
        ),
        ({"name": "a", "kind": "binary", "dropout": 1.5}, "dropout"),
    ],
)
def test_bad_task_specs(kwargs, message):
    with pytest.raises(UserError, match=message):
        TaskSpec(**kwargs)


def test_bad_aux_heads_and_duplicate_tasks():
    backbone = create_backbone("timm:test_resnet")
    with pytest.raises(UserError, match="unknown layer group 'layer7'"):
        MultiTaskModel(backbone, TASKS[:1], [AuxHeadSpec("digit", "layer7")])
    with pytest.raises(UserError, match="task 'nope'"):
        MultiTaskModel(backbone, TASKS[:1], [AuxHeadSpec("nope", "layer1")])
    with pytest.raises(UserError, match="defined twice"):
        MultiTaskModel(backbone, [TASKS[0], TASKS[0]])


def test_task_spec_round_trip():
    for spec in TASKS:
        assert TaskSpec.from_dict(spec.to_dict()) == spec
