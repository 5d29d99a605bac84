"""Fine-tune recipes: YAML files validated in full (with `--set` overrides) before a run starts."""

from transferkit.recipes.schema import (
    AuxHeadSection,
    DataSection,
    EarlyStoppingSection,
    ModelSection,
    PhaseSection,
    Recipe,
    ScheduleSection,
    TaskSection,
    TrainSection,
    apply_override,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    save_recipe,
)

__all__ = [
    "AuxHeadSection",
    "DataSection",
    "EarlyStoppingSection",
    "ModelSection",
    "PhaseSection",
    "Recipe",
    "ScheduleSection",
    "TaskSection",
    "TrainSection",
    "apply_override",
    "load_recipe",
    "parse_recipe",
    "recipe_to_dict",
    "save_recipe",
]
