"""Fine-tune recipes: YAML files validated in full (with `--set` overrides) before a run starts."""

from transferkit.recipes.io import (
    apply_override,
    find_recipe,
    parse_recipe,
    read_recipe_file,
    recipe_to_dict,
    save_recipe,
    shipped_recipes,
)
from transferkit.recipes.resolve import (
    ResolvedRecipe,
    from_origin,
    load_recipe,
    merged,
    resolve_recipe,
)
from transferkit.recipes.schema import (
    BEFORE_KEY_EXISTED,
    AuxHeadSection,
    DataSection,
    DistillSection,
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
    "DistillSection",
    "EarlyStoppingSection",
    "ModelSection",
    "MultitaskSection",
    "PhaseSection",
    "Recipe",
    "ResolvedRecipe",
    "ScheduleSection",
    "TaskSection",
    "TrainSection",
    "apply_override",
    "find_recipe",
    "from_origin",
    "load_recipe",
    "read_recipe_file",
    "shipped_recipes",
    "parse_recipe",
    "recipe_to_dict",
    "merged",
    "resolve_recipe",
    "save_recipe",
]
