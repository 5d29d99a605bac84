"""The model card: `README.md` in every finished run folder, as the Hugging Face Hub shows it.

`render_card(run_dir, summary)` builds it from the folder alone (recipe.yaml, model.json,
metrics.jsonl) and the completion summary, which the trainer extends with what only training
knows (`summary["card"]`: data sizes and label coverage, hardware, where the weights came
from). The trainer writes it just before complete.json; `transferkit push` re-renders it for
runs finished before cards existed.
"""

from __future__ import annotations

from typing import Any

import yaml

from transferkit.core import TaskSpec
from transferkit.rundir.folder import RunDir


def render_card(run_dir: RunDir, summary: dict[str, Any]) -> str:
    """The card's Markdown (with the Hub's YAML front matter)."""
    recipe_text = run_dir.recipe_path.read_text()
    recipe = yaml.safe_load(recipe_text)
    info = run_dir.info()
    facts = summary.get("card", {})
    tasks, backbone = info.tasks, info.backbone
    library = backbone.split(":", 1)[0]
    lines = [
        "---",
        "library_name: transferkit",
        f"tags: [transferkit, {library}, image-classification]",
        "---",
        "",
        f"# {recipe.get('name') or run_dir.path.name}",
        "",
        f"A `{backbone}` backbone fine-tuned with transferkit for "
        f"{len(tasks)} task{'s' if len(tasks) != 1 else ''}: "
        + ", ".join(f"`{t.name}` ({t.kind})" for t in tasks)
        + ".",
        "",
        "## Model",
        "",
        f"- Backbone: `{backbone}`" + _kwargs(info.model_kwargs),
        f"- Weights it started from: {_weights(recipe['model'].get('weights'), backbone)}",
    ]
    if facts.get("weights_report"):
        lines.append(f"- Loading them: {facts['weights_report']}")
    config = info.data_config
    size = info.image_size or config.input_size[1]
    lines += [
        f"- Input: RGB {size}x{size} px, resized by {config.interpolation} "
        f"(crop_pct {config.crop_pct}, {config.crop_mode} crop), normalized with mean "
        f"{_floats(config.mean)} and std {_floats(config.std)}",
        f"- Saved model: epoch {info.epoch}, the best by `{info.monitor}`",
    ]
    if info.aux_heads:
        keys = ", ".join(f"`{head.key}`" for head in info.aux_heads)
        lines.append(f"- Auxiliary heads (training signal; left out of exports by default): {keys}")
    lines += ["", "## Tasks", "", "| task | kind | outputs |", "|---|---|---|"]
    for task in tasks:
        names = task.class_names
        outputs = ", ".join(map(str, names)) if names else str(task.num_outputs)
        if task.standardized:
            outputs += (f" (learned standardized by the training split's mean {_floats(task.target_mean)}"
                        f" and sd {_floats(task.target_std)}; answers in the column's units)")  # fmt: skip
        lines.append(f"| {task.name} | {task.kind} | {outputs} |")
    lines += _data_section(recipe, facts.get("data"), tasks)
    lines += _metrics_section(run_dir, tasks, summary)
    lines += _training_section(recipe, run_dir, summary, facts)
    lines += _limitations(recipe, facts.get("data"), tasks)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import transferkit",
        "",
        'run = transferkit.load("path/to/this/folder")  # or an exported model.onnx',
        'print(run.predict("image.jpg"))',
        "```",
        "",
        "Export to ONNX (runs with onnxruntime, no torch): "
        "`transferkit export path/to/this/folder --format onnx`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _kwargs(kwargs) -> str:
    return f" with {', '.join(f'{k}={v}' for k, v in kwargs.items())}" if kwargs else ""


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _weights(weights, backbone: str) -> str:
    if weights is None:
        return "random initialization (trained from scratch)"
    if weights == "pretrained":  # the library's cache or hub, or a packaged checkpoint
        return f"pretrained weights for `{backbone}` (`model.weights: pretrained`)"
    return f"the weights in `{weights}`"


def _data_section(recipe: dict, data: dict | None, tasks: list[TaskSpec]) -> list[str]:
    source = recipe["data"]
    lines = ["", "## Data", "", f"Source: {source['source']} `{source['path']}`."]
    if not data:
        return lines + ["", "(Split sizes were not recorded for this run.)"]
    names = [t.name for t in tasks]
    lines += ["", "| split | images | " + " | ".join(f"{n} labelled" for n in names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for split, counts in data.items():
        if "streamed" in counts:  # a stream's size and label counts are not known ahead
            lines.append(f"| {split} | streamed: {counts['streamed']} |" + " |" * len(names))
            continue
        total = counts["images"]
        cells = [_share(counts["labelled"].get(n, 0), total) for n in names]
        lines.append(f"| {split} | {total} | " + " | ".join(cells) + " |")
    return lines


def _share(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.0f}%)" if total else str(count)


def _metrics_section(run_dir: RunDir, tasks: list[TaskSpec], summary: dict) -> list[str]:
    best = run_dir.best()
    lines = [
        "",
        "## Metrics",
        "",
        f"On the validation split, epoch {best['epoch']} (the saved model).",
        "",
    ]
    lines += ["| task | metric | value |", "|---|---|---|"]
    for task in tasks:
        prefix = f"val/{task.name}/"
        for key, value in best.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                shown = f"{value:.4f}" if isinstance(value, float) else str(value)
                lines.append(f"| {task.name} | {key[len(prefix) :]} | {shown} |")
    return lines


def _training_section(recipe: dict, run_dir: RunDir, summary: dict, facts: dict) -> list[str]:
    train, schedule = recipe["train"], recipe["schedule"]
    seconds = sum(r.get("epoch_time_s") or 0.0 for r in run_dir.records())
    lines = [
        "",
        "## Training",
        "",
        f"- {summary.get('epochs')} epochs, {summary.get('steps')} optimizer steps; ended: "
        f"{summary.get('stopped')}",
        f"- Optimizer {train['optimizer']}, lr {train['lr']}, batch size {train['batch_size']}, "
        f"scheduler {train['scheduler']}, seed {recipe.get('seed')}",
        f"- Training time: {seconds:.0f} s (the epochs' training loops)",
    ]
    if facts.get("hardware"):
        lines.append(f"- Hardware: {facts['hardware']}")
    lines += [
        "",
        "Freeze schedule:",
        "",
        "| from epoch | frozen | lr multipliers |",
        "|---|---|---|",
    ]
    for phase in schedule["phases"]:
        mults = ", ".join(f"{g} {m}" for g, m in (phase.get("lr_mult") or {}).items()) or "-"
        lines.append(f"| {phase['from_epoch']} | {phase['freeze']} | {mults} |")
    return lines


def _limitations(recipe: dict, data: dict | None, tasks: list[TaskSpec]) -> list[str]:
    source = recipe["data"]
    lines = ["", "## Limitations", ""]
    if source.get("val_split") is None:
        lines.append(
            f"- The validation images were carved at random ({source['val_fraction']:.0%}) from "
            "the training source: the metrics describe data like the training data, not other "
            "cameras, sites or populations."
        )
    lines.append(
        "- The saved epoch was chosen on the same validation split its metrics come from, so "
        "they are slightly optimistic; evaluate on held-out data (`transferkit eval --data`)."
    )
    train = (data or {}).get("train")
    train = None if train and "streamed" in train else train
    if train and train["images"] < 1000:
        lines.append(f"- Trained on only {train['images']} images.")
    for task in tasks:
        if task.kind == "multiclass":
            lines.append(
                f"- `{task.name}` always answers one of its {task.num_outputs} classes, "
                "even for an image that shows none of them."
            )
        if task.kind == "regression":
            lines.append(f"- `{task.name}` predicts values in the units of its training column.")
        if train and train["labelled"].get(task.name, 0) < train["images"]:
            missing = train["images"] - train["labelled"].get(task.name, 0)
            lines.append(f"- `{task.name}`: {missing} training images had no label for it.")
    if source.get("max_samples"):
        lines.append(f"- data.max_samples {source['max_samples']}: only part of the data was used.")
    return lines
