"""Knowledge distillation (Hinton et al., 2015): a student learns each task from its labels
and from a finished run's outputs, `distill: {teacher: RUN_DIR, alpha, temperature}`.

Per task, the loss is (1 - alpha) x the loss on the labels (rows that have one) + alpha x the
loss on the teacher's outputs (every row, unlabelled ones included: `data.unlabeled`):

- multiclass: KL(softmax(teacher / T) || softmax(student / T)) x T², the soft targets;
- binary and multilabel: the same per sigmoid output (Bernoulli KL), x T²;
- regression: the squared error to the teacher's value, in the task's standard units when the
  task is standardized (as its label loss is).

T² keeps the soft term's gradients at the scale of the label term's (Hinton et al., sec. 2).
The teacher runs without gradients and in eval mode, so its outputs depend on the image only.
When the training images are not augmented (`data.augment: none`, no mixup), those outputs are
computed once before training, with the teacher's own preprocessing, and looked up by row:
also in phases that train from cached features, where no image reaches the step. Otherwise the
teacher sees each batch's images, re-normalized and resized from the student's preprocessing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transferkit.core import TaskSpec, task_of
from transferkit.data import TaskImageDataset, build_transforms, collate
from transferkit.engine.losses import device_constant
from transferkit.errors import UserError
from transferkit.recipes import DistillSection
from transferkit.rundir import RunDir, load_saved_model


class Distiller:
    """The teacher's outputs as a second target for each task (see the module docstring)."""

    def __init__(self, teacher, teacher_info, tasks: dict[str, TaskSpec], section: DistillSection,
                 student_config, device: torch.device) -> None:  # fmt: skip
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.info, self.tasks, self.device = teacher_info, tasks, device
        self.alpha, self.temperature = section.alpha, section.temperature
        self.student_config = student_config
        self.by_row: dict[str, torch.Tensor] | None = None  # precomputed outputs, by train row

    @torch.no_grad()
    def precompute(self, train_split, batch_size: int) -> None:
        """The teacher's outputs for every training row, with its own eval preprocessing."""
        transform = build_transforms(self.info.data_config, False, "none", self.info.image_size)
        dataset = TaskImageDataset(train_split, [], transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.tasks}
        for batch in loader:
            outputs = self.teacher(batch["image"].to(self.device))
            for name in self.tasks:
                parts[name].append(outputs[name].float())
        self.by_row = {name: torch.cat(values) for name, values in parts.items()}

    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.by_row is not None:
            rows = batch["index"].to(self.device)
            return {name: values[rows] for name, values in self.by_row.items()}
        if "image" not in batch:
            raise UserError("distill: the teacher needs the images of each batch; set "
                            "train.feature_cache: forbid")  # fmt: skip
        outputs = self.teacher(self._teacher_view(batch["image"]))
        return {name: outputs[name].float() for name in self.tasks}

    def _teacher_view(self, images: torch.Tensor) -> torch.Tensor:
        """The student's preprocessed batch in the teacher's normalization and input size."""
        student, teacher = self.student_config, self.info.data_config

        def column(values):
            return device_constant(tuple(values), images.device, images.dtype).view(1, -1, 1, 1)

        pixels = images * column(student.std) + column(student.mean)
        view = (pixels - column(teacher.mean)) / column(teacher.std)
        size = self.info.image_size or teacher.input_size[-1]
        if view.shape[-1] != size or view.shape[-2] != size:
            view = F.interpolate(view, size=(size, size), mode="bilinear", align_corners=False)
        return view

    def combine(self, outputs: dict[str, torch.Tensor], batch: dict,
                losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # fmt: skip
        """Each task's label loss mixed with its distillation loss; auxiliary heads unchanged."""
        teacher = self.teacher_outputs(batch)
        mixed = dict(losses)
        for key, loss in losses.items():
            if task_of(key) != key:  # an auxiliary head ("task@group"): labels only
                continue
            soft = distill_loss(self.tasks[key], outputs[key].float(), teacher[key],
                                self.temperature)  # fmt: skip
            mixed[key] = (1 - self.alpha) * loss + self.alpha * soft
        return mixed


def distill_loss(task: TaskSpec, student: torch.Tensor, teacher: torch.Tensor,
                 temperature: float) -> torch.Tensor:  # fmt: skip
    """The distillation loss of one task over every row (see the module docstring)."""
    t = temperature
    if task.kind == "multiclass":
        log_p = F.log_softmax(student / t, dim=-1)
        return F.kl_div(log_p, F.log_softmax(teacher / t, dim=-1), reduction="batchmean",
                        log_target=True) * t * t  # fmt: skip
    if task.kind in ("binary", "multilabel"):
        target = torch.sigmoid(teacher / t)
        # Cross-entropy minus the target's entropy: the KL, zero when the student matches.
        cross = F.binary_cross_entropy_with_logits(student / t, target)
        entropy = F.binary_cross_entropy_with_logits(teacher / t, target)
        return (cross - entropy) * t * t
    if task.standardized:
        scale = device_constant(task.target_std, student.device)
        return F.mse_loss(student / scale, teacher / scale)
    return F.mse_loss(student, teacher)


def build_distiller(section: DistillSection | None, tasks: dict[str, TaskSpec], student_config,
                    device: torch.device) -> Distiller | None:  # fmt: skip
    """The recipe's teacher, loaded and checked against the student's tasks."""
    if section is None:
        return None
    folder = RunDir(section.teacher)
    if not folder.has_model():
        raise UserError(f"distill.teacher: {section.teacher} has no saved model; name a run "
                        "folder whose training has finished (model.json and model.safetensors)")  # fmt: skip
    model, info = load_saved_model(folder)
    specs = info.task_specs
    for name, task in tasks.items():
        found = specs.get(name)
        if not task.predicts_like(found):
            seen = f"{found.kind}, classes {found.class_names}" if found else "no such task"
            raise UserError(
                f"distill.teacher: task {name!r} ({task.kind}, classes {task.class_names}) is "
                f"not the teacher's ({seen}); a teacher must predict the student's tasks with "
                "the same classes"
            )
    return Distiller(model, info, tasks, section, student_config, device)
