"""Fine-tune recipes: YAML files validated in full (with `--set` overrides) before a run starts."""

from transferkit.recipes.io import (
    apply_override,
    find_recipe,
    load_recipe,
    parse_recipe,
    read_recipe_file,
    recipe_to_dict,
    save_recipe,
    shipped_recipes,
)
from transferkit.recipes.schema import (
    BEFORE_KEY_EXISTED,
    AuxHeadSection,
    DataSection,
    EarlyStoppingSection,
    ModelSection,
    MultitaskSection,
    PhaseSection,
    Recipe,
    ScheduleSection,
    TaskSection,
    TrainSection,
)

__all__ = [
    "BEFORE_KEY_EXISTED",
    "AuxHeadSection",
    "DataSection",
    "EarlyStoppingSection",
    "ModelSection",
    "MultitaskSection",
    "PhaseSection",
    "Recipe",
    "ScheduleSection",
    "TaskSection",
    "TrainSection",
    "apply_override",
    "find_recipe",
    "load_recipe",
    "read_recipe_file",
    "shipped_recipes",
    "parse_recipe",
    "recipe_to_dict",
    "save_recipe",
]
