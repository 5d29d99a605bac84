"""The run folder's final model: `model.safetensors` + `model.json`, and loading it back."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from transferkit.errors import UserError
from transferkit.models import AuxHeadSpec, DataConfig, MultiTaskModel, TaskSpec, create_backbone


def model_info(
    model: MultiTaskModel, backbone_spec: str, model_kwargs: dict, image_size: int | None
) -> dict:
    """What `load_run` needs to rebuild the model and its preprocessing."""
    return {
        "backbone": backbone_spec,
        "model_kwargs": model_kwargs,
        "tasks": [spec.to_dict() for spec in model.tasks.values()],
        "aux_heads": [spec.to_dict() for spec in model.aux_specs],
        "data_config": model.backbone.data_config.to_dict(),
        "image_size": image_size,
    }


def save_model(model: MultiTaskModel, info: dict, run_dir: Path) -> None:
    """Write the final model atomically (temporary names, then rename)."""
    from safetensors.torch import save_model as save_safetensors

    tmp_weights, tmp_info = run_dir / "model.safetensors.tmp", run_dir / "model.json.tmp"
    metadata = {
        "format": "pt",
        "transferkit.backbone": info["backbone"],
        "transferkit.data_config": json.dumps(info["data_config"]),
    }
    save_safetensors(model, str(tmp_weights), metadata=metadata)
    tmp_info.write_text(json.dumps(info, indent=2))
    tmp_weights.replace(run_dir / "model.safetensors")
    tmp_info.replace(run_dir / "model.json")


@dataclass
class Run:
    """A trained model ready for inference: `run.predict(images)` or `run.model(run.transform(img))`."""

    model: MultiTaskModel
    transform: Callable
    tasks: dict[str, TaskSpec]
    info: dict

    @torch.no_grad()
    def predict(self, images: Sequence) -> list[dict]:
        """PIL images -> per image, per task: `{"label", "score"}` (classification) or `{"value"}`."""
        from transferkit.engine.metrics import prediction

        batch = torch.stack([self.transform(image.convert("RGB")) for image in images])
        outputs = self.model.eval()(batch)
        results = [{} for _ in images]
        for name, task in self.tasks.items():
            probs = prediction(task, outputs[name])
            for i, p in enumerate(probs):
                results[i][name] = describe_prediction(task, p)
        return results


def describe_prediction(task: TaskSpec, p: torch.Tensor) -> dict:
    """A task's probabilities or values for one image, as `predict` prints them."""
    names = task.class_names
    if task.kind == "multiclass":
        index = int(p.argmax())
        return {"label": names[index] if names else index, "score": round(float(p[index]), 4)}
    if task.kind == "binary":
        positive = float(p) >= 0.5
        label = (names[1] if positive else names[0]) if names else int(positive)
        return {"label": label, "score": round(float(p) if positive else 1 - float(p), 4)}
    if task.kind == "multilabel":
        on = [names[i] if names else i for i, v in enumerate(p.tolist()) if v >= 0.5]
        return {"labels": on, "scores": [round(v, 4) for v in p.tolist()]}
    values = p.reshape(-1).tolist()
    return {"value": round(values[0], 4) if len(values) == 1 else [round(v, 4) for v in values]}


def load_run(run_dir: str | Path) -> Run:
    """Rebuild a run's final model with its preprocessing (for notebooks and scripts)."""
    from safetensors.torch import load_model

    from transferkit.data import build_transforms

    run_dir = Path(run_dir)
    info_path, weights = run_dir / "model.json", run_dir / "model.safetensors"
    if not info_path.is_file() or not weights.is_file():
        raise UserError(
            f"{run_dir} has no final model (model.json and model.safetensors); is it a finished run folder?"
        )
    info = json.loads(info_path.read_text())
    tasks = [TaskSpec.from_dict(t) for t in info["tasks"]]
    backbone = create_backbone(info["backbone"], None, **info.get("model_kwargs", {}))
    backbone.data_config = DataConfig.from_dict(info["data_config"])
    model = MultiTaskModel(backbone, tasks, [AuxHeadSpec(**a) for a in info.get("aux_heads", [])])
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as err:
        raise UserError(
            f"{weights} does not match {info_path}: {str(err).splitlines()[0][:200]}"
        ) from None
    transform = build_transforms(
        backbone.data_config, train=False, augment="none", image_size=info.get("image_size")
    )
    return Run(model.eval(), transform, {t.name: t for t in tasks}, info)


load = load_run
