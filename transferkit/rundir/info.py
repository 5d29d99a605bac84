"""`model.json` as a type: what rebuilds a run's model and its preprocessing, which epoch the
weights are from, and how eval and predict adjust it (test-time views, temperatures).

Written by the trainer, updated by `calibrate`, written for mixes and soups by `interpolate
--save` and `ensemble --save-soup`, read by inference, the model card, ensembles,
WiSE-FT and export. Torch-free. Files written before a key existed read with its old meaning
(no adapter, no EMA, no test-time views, flips allowed, no temperatures).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from transferkit.core import AuxHeadSpec, DataConfig, TaskSpec
from transferkit.errors import UserError

_ONLY_WHEN_SET = ("temperatures", "calibration", "wise_ft", "soup")


@dataclass(kw_only=True)
class ModelInfo:
    backbone: str  # SOURCE:NAME, as in the recipe
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskSpec]
    aux_heads: list[AuxHeadSpec] = field(default_factory=list)
    data_config: DataConfig  # the preprocessing that belongs to the weights
    image_size: int | None = None  # data.image_size; None: the data config's
    epoch: int | None = None  # the epoch these weights are from
    monitor: str | None = None  # the metric that chose that epoch
    adapter: dict[str, Any] | None = None  # a peft adapter's spec (models.AdapterSpec.to_dict)
    ema: bool = False  # the weights are train.ema's average
    tta: list[str] = field(default_factory=list)  # test-time views eval and predict average
    horizontal_flip: bool = True  # whether test-time flips are allowed
    temperatures: dict[str, float] = field(default_factory=dict)  # `transferkit calibrate`
    calibration: dict[str, Any] | None = None  # what calibrate measured, before and after
    wise_ft: dict[str, Any] | None = None  # a WiSE-FT mix (`interpolate --save`): alpha, start, run
    soup: dict[str, Any] | None = None  # a weight soup (`ensemble --save-soup`): kind, ingredients

    @property
    def task_specs(self) -> dict[str, TaskSpec]:
        return {task.name: task for task in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        """model.json's content (keys in the order this file has always had them)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["tasks"] = [task.to_dict() for task in self.tasks]
        data["aux_heads"] = [head.to_dict() for head in self.aux_heads]
        data["data_config"] = self.data_config.to_dict()
        for key in _ONLY_WHEN_SET:  # absent, as in files written before they existed
            if not data[key]:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model.json") -> ModelInfo:
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in known}
            values["tasks"] = [TaskSpec.from_dict(t) for t in data["tasks"]]
            values["aux_heads"] = [AuxHeadSpec(**a) for a in data.get("aux_heads") or []]
            values["data_config"] = DataConfig.from_dict(data["data_config"])
            values["model_kwargs"] = dict(data.get("model_kwargs") or {})
            values["tta"] = list(data.get("tta") or [])
            values["temperatures"] = dict(data.get("temperatures") or {})
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where} is not a transferkit model description ({err!r})") from None
