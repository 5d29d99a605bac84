"""What a task is: `TaskSpec`, its kind, output count and class names. Torch-free, so that an
exported model's tasks can be described where torch is not installed (`transferkit.inference.onnx_run`);
`transferkit.models` re-exports it with the heads built from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transferkit.errors import UserError

TASK_KINDS: tuple[str, ...] = ("multiclass", "binary", "multilabel", "regression")
# ece: expected calibration error (15 bins), how far the predicted confidence is from accuracy.
CLASSIFICATION_METRICS = ("accuracy", "f1", "auroc", "ece")
REGRESSION_METRICS = ("mae", "rmse", "r2")
LOWER_IS_BETTER = ("mae", "rmse", "loss", "ece")  # metric names that improve downwards
# train.monitor: val/mean_score, every task's accuracy or R^2 averaged (a multi-task epoch's score)
MEAN_SCORE = "mean_score"


def score_metric(kind: str) -> str:
    """A task's score in `mean_score` and in `fit`'s: accuracy, or R^2 for a regression."""
    return "r2" if kind == "regression" else "accuracy"


AUX_SEPARATOR = "@"  # an auxiliary head's output key: "task@group"


def task_of(output_key: str) -> str:
    """The task an output belongs to: "digit" for "digit" and for the auxiliary "digit@layer2"."""
    return output_key.split(AUX_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: its kind, output size and head shape.

    `num_outputs` is the number of classes (multiclass), labels (multilabel) or targets
    (regression); binary tasks have one output. `hidden` adds an MLP layer of that width.

    A regression task may be standardized: the head learns `(y - target_mean) / target_std`
    (one per target, from the training split) and answers in the column's own units, so its
    loss is in standard units beside the classification losses and everything downstream
    (metrics, predictions, exports) sees the original units.
    """

    name: str
    kind: str
    num_outputs: int = 1
    hidden: int | None = None
    dropout: float = 0.0
    class_names: tuple[str, ...] | None = None
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    def predicts_like(self, other: TaskSpec | None) -> bool:
        """Whether `other` has this task's kind, outputs and classes: two runs whose outputs can
        be compared, averaged or learned from one another."""
        return other is not None and (other.kind, other.num_outputs, other.class_names) == (
            self.kind, self.num_outputs, self.class_names)  # fmt: skip

    def __post_init__(self) -> None:
        if not self.name or "." in self.name or "@" in self.name:
            raise UserError(f"task name {self.name!r} must be non-empty and contain no '.' or '@'")
        if self.kind not in TASK_KINDS:
            raise UserError(
                f"task {self.name!r}: kind must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}"
            )
        if self.kind == "binary" and self.num_outputs != 1:
            raise UserError(
                f"task {self.name!r}: a binary task has one output, got num_outputs={self.num_outputs}"
            )
        if self.kind == "multiclass" and self.num_outputs < 2:
            raise UserError(f"task {self.name!r}: a multiclass task needs at least 2 classes")
        if self.num_outputs < 1:
            raise UserError(f"task {self.name!r}: num_outputs must be at least 1")
        named = self.class_names is not None and self.kind in ("multiclass", "multilabel")
        if named and len(self.class_names) != self.num_outputs:
            raise UserError(
                f"task {self.name!r}: {len(self.class_names)} class names for {self.num_outputs} outputs"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"task {self.name!r}: dropout must be in [0, 1), got {self.dropout}")
        if (self.target_mean is None) != (self.target_std is None):
            raise UserError(f"task {self.name!r}: target_mean and target_std go together")
        if self.target_std is not None:
            if self.kind != "regression":
                raise UserError(f"task {self.name!r}: only a regression task is standardized")
            if not len(self.target_mean) == len(self.target_std) == self.num_outputs:
                raise UserError(
                    f"task {self.name!r}: one target_mean and target_std per target "
                    f"({self.num_outputs})"
                )
            if not all(s > 0 for s in self.target_std):
                raise UserError(f"task {self.name!r}: target_std must be > 0")

    @property
    def standardized(self) -> bool:
        return self.target_std is not None

    def to_dict(self) -> dict:
        """A JSON-ready dict (inverse of `from_dict`); unset target statistics are left out."""
        data = asdict(self)
        data["class_names"] = list(self.class_names) if self.class_names is not None else None
        for key in ("target_mean", "target_std"):
            if data[key] is None:
                del data[key]
            else:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        """Build from `to_dict` output."""
        data = dict(data)
        if data.get("class_names") is not None:
            data["class_names"] = tuple(str(c) for c in data["class_names"])
        for key in ("target_mean", "target_std"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


@dataclass(frozen=True)
class AuxHeadSpec:
    """An auxiliary head for `task` on the feature map of backbone group `group` (deep supervision).

    Its output is returned under the key `"{task}@{group}"`.
    """

    task: str
    group: str
    hidden: int | None = None
    dropout: float = 0.0

    @property
    def key(self) -> str:
        """The output key of this head."""
        return f"{self.task}{AUX_SEPARATOR}{self.group}"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)
