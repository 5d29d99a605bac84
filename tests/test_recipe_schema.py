"""Recipe schema: validation messages name the key path, overrides, YAML I/O, and fuzzing."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferkit.errors import UserError
from transferkit.recipes import (
    EarlyStoppingSection,
    PhaseSection,
    Recipe,
    apply_override,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    save_recipe,
)

MINIMAL = {
    "model": {"backbone": "timm:resnet18"},
    "tasks": {"digit": {"kind": "multiclass"}},
    "data": {"source": "imagefolder", "path": "data/digits"},
}

FULL = {
    "name": "full",
    "output_dir": "out",
    "seed": 7,
    "model": {
        "backbone": "torchvision:resnet18",
        "weights": "pretrained",
        "kwargs": {"drop_rate": 0.1, "extra": [1, {"a": None}]},
        "aux_heads": [{"task": "digit", "group": "layer3", "hidden": 64, "dropout": 0.1}],
    },
    "tasks": {
        "digit": {"kind": "multiclass", "classes": ["0", "1", "2"], "metrics": ["accuracy", "f1"]},
        "odd": {"kind": "binary", "classes": ["no", "yes"], "weight": 0.5, "hidden": 32},
        "tags": {"kind": "multilabel", "column": ["t1", "t2"], "classes": ["a", "b"]},
        "size": {"kind": "regression", "column": ["w", "h"], "metrics": ["mae", "r2"]},
    },
    "data": {
        "source": "manifest",
        "path": "data/manifest.csv",
        "val_split": None,
        "test_split": "test",
        "val_fraction": 0.1,
        "image_size": 64,
        "augment": "strong",
        "bad_images": "error",
        "num_workers": 2,
        "max_samples": 100,
    },
    "schedule": {
        "phases": [
            {"from_epoch": 0, "freeze": "all"},
            {"from_epoch": 2, "freeze": "up_to:layer2@norm=train", "lr_mult": {"heads": 10}},
        ],
        "layer_decay": 0.75,
    },
    "train": {
        "epochs": 5,
        "max_steps": 50,
        "optimizer": "sgd",
        "lr": 0.01,
        "scheduler": "step",
        "mixed_precision": "bf16",
        "clip_grad": 1.0,
        "early_stopping": {"patience": 2, "min_delta": 0.001},
        "monitor": "val/digit/accuracy",
        "monitor_mode": "max",
    },
}


def recipe_with(*overrides: str, base: dict = MINIMAL) -> Recipe:
    return parse_recipe(copy.deepcopy(base), overrides)


def error_of(*overrides: str, base: dict = MINIMAL) -> str:
    with pytest.raises(UserError) as info:
        recipe_with(*overrides, base=base)
    message = str(info.value)
    assert "\n" not in message  # one line, for the CLI
    return message


# --- valid recipes --------------------------------------------------------------------------


def test_full_recipe_round_trips_through_dict_and_yaml():
    recipe = parse_recipe(copy.deepcopy(FULL))
    data = recipe_to_dict(recipe)
    assert parse_recipe(data) == recipe
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(data))) == recipe
    assert recipe.tasks["size"].column == ["w", "h"]
    assert recipe.schedule.phases[1].lr_mult == {"heads": 10.0}
    assert recipe.train.early_stopping == EarlyStoppingSection(patience=2, min_delta=0.001)


def test_defaults_fill():
    recipe = recipe_with()
    assert (recipe.name, recipe.output_dir, recipe.seed) == ("", "runs", 0)
    assert recipe.model.weights == "auto" and recipe.model.aux_heads == []  # resolved by the run
    task = recipe.tasks["digit"]
    assert (task.column, task.classes, task.dropout, task.weight) == (None, None, 0.0, 1.0)
    assert recipe.data.val_split == "validation" and recipe.data.augment == "light"
    assert recipe.schedule.phases == [PhaseSection(from_epoch=0, freeze="none")]
    assert recipe.train.epochs == 10 and recipe.train.lr == 1e-3
    assert recipe.train.early_stopping is None and recipe.train.mixed_precision == "no"


def test_parse_does_not_mutate_its_input():
    data = copy.deepcopy(FULL)
    recipe = parse_recipe(data, ["model.kwargs.drop_rate=0.5"])
    recipe.model.kwargs["extra"][1]["a"] = "changed"
    assert data == FULL


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=1e-3", 1e-3),  # PyYAML reads 1e-3 as a string; float fields accept it
        ("train.lr=1", 1.0),  # ints are fine for floats
        ("train.mixed_precision=no", "no"),  # YAML 1.1 reads `no` as false
        ("model.weights=none", None),  # "none" is normalized to None
        ("model.weights=NONE", None),
        ("model.weights=random", None),  # what create_backbone calls random weights too
        ("train.early_stopping={}", EarlyStoppingSection()),
    ],
)
def test_yaml_quirks_mean_what_the_user_wrote(override, expected):
    recipe = recipe_with(override)
    section, key = override.split("=")[0].split(".")
    assert getattr(getattr(recipe, section), key) == expected


# --- errors ---------------------------------------------------------------------------------


def test_typo_gets_a_suggestion():
    data = copy.deepcopy(MINIMAL) | {"train": {"learning_rate": 0.1}}
    with pytest.raises(
        UserError, match=r"unknown recipe key train\.learning_rate\. Did you mean: lr\?"
    ):
        parse_recipe(data)
    data = copy.deepcopy(MINIMAL) | {"trian": {}}
    with pytest.raises(UserError, match=r"unknown recipe key trian\. Did you mean: train\?"):
        parse_recipe(data)


def test_unknown_nested_keys_name_their_path():
    data = copy.deepcopy(FULL)
    data["schedule"]["phases"][1]["frezee"] = "all"
    data["model"]["aux_heads"][0]["grup"] = "x"
    data["tasks"]["digit"]["kinds"] = "binary"
    message = str(pytest.raises(UserError, parse_recipe, data).value)
    assert "unknown recipe key schedule.phases.1.frezee. Did you mean: freeze?" in message
    assert "unknown recipe key model.aux_heads.0.grup. Did you mean: group?" in message
    assert "unknown recipe key tasks.digit.kinds. Did you mean: kind?" in message
    assert message.count("; ") == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=fast", "recipe key train.lr: expected a number, got 'fast'"),
        ("train.epochs=true", "recipe key train.epochs: expected an integer, got True"),
        ("train.lr=false", "recipe key train.lr: expected a number, got False"),
        ("train.epochs=2.5", "recipe key train.epochs: expected an integer, got 2.5"),
        ("train.lr=.nan", "recipe key train.lr: expected a finite number"),
        ("data.trust_remote_code=1", "recipe key data.trust_remote_code: expected true or false"),
        ("data.path=[a]", "recipe key data.path: expected a string, got ['a']"),
        ("data.image_size=big", "recipe key data.image_size: expected an integer or null"),
        ("tasks.digit.classes=a", "recipe key tasks.digit.classes: expected a list or null"),
        ("tasks.digit.classes=[a, [b]]", "recipe key tasks.digit.classes.1: expected a string"),
        ("tasks.size={kind: regression, column: [w, 3]}", "recipe key tasks.size.column.1:"),
        ("schedule.phases.0.lr_mult={heads: x}", "recipe key schedule.phases.0.lr_mult.heads:"),
        ("train.early_stopping=3", "recipe key train.early_stopping: expected a mapping or null"),
        ("model.kwargs=[1]", "recipe key model.kwargs: expected a mapping, got [1]"),
    ],
)
def test_wrong_types_name_the_key(override, expected):
    assert expected in error_of(override)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "data.augment=heavy",
            "recipe key data.augment: 'heavy' is neither a preset (none, light, strong) nor a "
            "timm policy",
        ),
        (
            "train.optimizer=adam",
            "recipe key train.optimizer: must be one of adamw, sgd, got 'adam'",
        ),
        ("tasks.digit.kind=ordinal", "recipe key tasks.digit.kind: must be one of multiclass,"),
    ],
)
def test_bad_literal(override, expected):
    assert expected in error_of(override)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=0", "recipe key train.lr: must be > 0, got 0.0"),
        ("train.epochs=0", "recipe key train.epochs: must be >= 1, got 0"),
        ("tasks.digit.dropout=1", "recipe key tasks.digit.dropout: must be < 1, got 1.0"),
        ("data.val_fraction=0", "recipe key data.val_fraction: must be > 0"),
        ("data.image_size=4", "recipe key data.image_size: must be >= 8"),
        ("schedule.layer_decay=1.5", "recipe key schedule.layer_decay: must be <= 1"),
        (
            "train.early_stopping.patience=0",
            "recipe key train.early_stopping.patience: must be >= 1",
        ),
        (
            "schedule.phases.0.lr_mult.heads=-1",
            "recipe key schedule.phases.0.lr_mult.heads: must be >= 0",
        ),
    ],
)
def test_out_of_range(override, expected):
    assert expected in error_of(override)


def test_missing_required_keys():
    message = str(pytest.raises(UserError, parse_recipe, {"model": {}, "tasks": {"t": {}}}).value)
    assert "missing required recipe key model.backbone" in message
    assert "missing required recipe key tasks.t.kind" in message
    assert "missing required recipe key data" in message
    assert "recipe key (top level): expected a mapping" in error_of(base=[])  # type: ignore


def test_bad_freeze_spec_is_prefixed_with_its_key():
    message = error_of("schedule.phases.1={from_epoch: 3, freeze: 'up_to'}")
    assert message.startswith(
        "recipe key schedule.phases.1.freeze: freeze mode 'up_to' needs a target"
    )
    assert "recipe key schedule.phases.0.freeze: bad freeze option" in error_of(
        "schedule.phases.0.freeze=all@norm=sometimes"
    )


def test_phases_must_start_at_zero_and_increase():
    message = error_of(
        "schedule.phases=[{from_epoch: 0}, {from_epoch: 3}, {from_epoch: 3}, {from_epoch: 1}]"
    )
    assert "recipe key schedule.phases.2.from_epoch: must be greater than the previous" in message
    assert "recipe key schedule.phases.3.from_epoch" in message
    assert "phases.1.from_epoch" not in message
    first = error_of("schedule.phases.0.from_epoch=1")
    assert "recipe key schedule.phases.0.from_epoch: the first phase must start at 0" in first
    assert "recipe key schedule.phases: at least one phase" in error_of("schedule.phases=[]")


def test_cross_field_checks():
    aux = error_of("model.aux_heads.0={task: digt, group: layer3}")
    assert "recipe key model.aux_heads.0.task: unknown task 'digt'" in aux
    assert "Did you mean: digit?" in aux
    assert "recipe key tasks: at least one task" in error_of("tasks={}")
    assert "bad task name 'a@b'" in error_of("tasks.a@b={kind: binary}")
    assert "bad task name 'a.b'" in error_of("tasks={a.b: {kind: binary}}")
    assert "bad task name ''" in error_of("tasks={'': {kind: binary}}")
    assert "recipe key model.backbone: expected 'timm:NAME'" in error_of("model.backbone=resnet18")
    assert "recipe key model.backbone" in error_of("model.backbone=hf:resnet18")
    assert "recipe key tasks.digit.column: a list of columns" in error_of(
        "tasks.digit.column=[a, b]"
    )
    assert "recipe key tasks.r.classes: a regression" in error_of(
        "tasks.r={kind: regression, classes: [a]}"
    )
    assert "exactly 2 classes, got 3" in error_of("tasks.b={kind: binary, classes: [a, b, c]}")
    assert "recipe key tasks.digit.metrics.1: 'mae' is not a multiclass metric" in error_of(
        "tasks.digit.metrics=[f1, mae]"
    )
    assert "Did you mean: rmse?" in error_of("tasks.r={kind: regression, metrics: [rmes]}")


# --- overrides ------------------------------------------------------------------------------


def test_override_parses_values_as_yaml():
    recipe = recipe_with(
        "train.lr=0.01",
        "data.trust_remote_code=true",
        "data.val_split=null",
        "tasks.digit.classes=[a, b, c]",
        "model.kwargs.drop_path_rate=0.2",
        "train.monitor=val/digit/f1",
    )
    assert recipe.train.lr == 0.01 and recipe.data.trust_remote_code is True
    assert recipe.data.val_split is None
    assert recipe.tasks["digit"].classes == ["a", "b", "c"]
    assert recipe.model.kwargs == {"drop_path_rate": 0.2}
    assert recipe.train.monitor == "val/digit/f1"


def test_override_sets_absent_keys_and_list_items():
    recipe = recipe_with(
        "train.early_stopping.patience=5",  # absent section is created
        "schedule.phases.1.freeze=all",  # appends after the default phase
        "schedule.phases.1.from_epoch=2",
        "schedule.phases.0.freeze=up_to:1",  # edits the default phase in place
        "tasks.odd.kind=binary",  # a new task
    )
    assert recipe.train.early_stopping == EarlyStoppingSection(patience=5)
    assert recipe.schedule.phases == [
        PhaseSection(from_epoch=0, freeze="up_to:1"),
        PhaseSection(from_epoch=2, freeze="all"),
    ]
    assert recipe.tasks["odd"].kind == "binary"
    full = recipe_with("model.aux_heads.0.hidden=8", "tasks.size.column.1=depth", base=FULL)
    assert full.model.aux_heads[0].hidden == 8
    assert full.tasks["size"].column == ["w", "depth"]


def test_apply_override_returns_a_new_dict():
    data = copy.deepcopy(MINIMAL)
    out = apply_override(data, "tasks.digit.hidden=16")
    assert out["tasks"]["digit"]["hidden"] == 16
    assert data == MINIMAL


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "bad override 'train.lr': expected KEY.PATH=VALUE"),
        ("=1", "bad override '=1': the key path '' has an empty part"),
        ("train..lr=1", "has an empty part"),
        ("train.lr=[1", "bad override 'train.lr=[1': cannot read '[1' as a YAML value"),
        ("train.learning_rate=0.1", "unknown recipe key train.learning_rate"),
        ("train.lr.x=1", "recipe key train.lr has no sub-keys"),
        ("schedule.phases.5.freeze=all", "'5' is not an index into recipe key schedule.phases"),
        ("schedule.phases.first.freeze=all", "'first' is not an index"),
    ],
)
def test_bad_overrides(override, expected):
    assert expected in error_of(override)


def test_unknown_override_key_suggests():
    assert "Did you mean: lr?" in error_of("train.learning_rate=0.1")
    assert "Did you mean: image_size" in error_of("data.imagesize=64")


def test_override_through_a_scalar_in_the_file_is_an_error():
    data = copy.deepcopy(MINIMAL) | {"train": 5}
    with pytest.raises(UserError, match=r"recipe key train is 5, not a mapping"):
        parse_recipe(data, ["train.lr=0.1"])


# --- files ----------------------------------------------------------------------------------


def test_load_recipe_fills_name_from_stem_and_applies_overrides(tmp_path):
    path = tmp_path / "digits_probe.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(path, ["train.epochs=3"])
    assert recipe.name == "digits_probe" and recipe.train.epochs == 3
    path.write_text(yaml.safe_dump(MINIMAL | {"name": "explicit"}))
    assert load_recipe(str(path)).name == "explicit"


def test_save_then_load_round_trips(tmp_path):
    recipe = parse_recipe(copy.deepcopy(FULL), ["model.weights=none"])
    path = tmp_path / "nested" / "resolved.yaml"
    save_recipe(recipe, path)
    assert load_recipe(path) == recipe
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 0.01


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  backbone: timm:resnet18\ntasks: [a,\n")
    with pytest.raises(UserError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_recipe(path)


def test_file_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="a recipe must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(MINIMAL | {"seed": "x"}))
    with pytest.raises(UserError, match=r"bad\.yaml: recipe key seed: expected an integer"):
        load_recipe(tmp_path / "bad.yaml")


# --- fuzzing: anything in, a Recipe or a UserError out ----------------------------------------

KEYS = sorted(
    {
        "model", "tasks", "data", "schedule", "train", "name", "seed", "backbone", "weights",
        "kwargs", "aux_heads", "task", "group", "hidden", "dropout", "kind", "column", "classes",
        "metrics", "source", "path", "phases", "from_epoch", "freeze", "lr_mult", "lr", "epochs",
        "early_stopping", "patience", "digit", "0", "1",
    }
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["timm:resnet18", "multiclass", "regression", "all", "up_to:", "none"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
PATHS = st.lists(st.sampled_from(KEYS) | st.text(max_size=5), min_size=1, max_size=4).map(".".join)
OVERRIDES = st.builds("{}={}".format, PATHS, st.text(max_size=15) | VALUES.map(yaml.safe_dump)) | (
    st.text(max_size=30)
)


def parses_or_user_error(data, overrides=()) -> bool:
    try:
        return isinstance(parse_recipe(data, overrides), Recipe)
    except UserError as err:
        return bool(str(err))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), VALUES, max_size=6))
def test_fuzz_random_dicts(data):
    assert parses_or_user_error(data)


@FUZZ
@given(st.sampled_from([MINIMAL, FULL]), st.lists(OVERRIDES, max_size=4))
def test_fuzz_overrides_on_valid_recipes(base, overrides):
    assert parses_or_user_error(copy.deepcopy(base), overrides)


def leaf_paths(node, prefix=()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    paths = []
    for key, value in items:
        paths.append((*prefix, key))
        if isinstance(value, (dict, list)):
            paths += leaf_paths(value, (*prefix, key))
    return paths


@FUZZ
@given(st.sampled_from(leaf_paths(FULL)), VALUES)
def test_fuzz_replacing_one_value(path, value):
    data = copy.deepcopy(FULL)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert parses_or_user_error(data)
