"""A run folder's saved model rebuilt: the backbone its `model.json` names (with its adapter),
the heads, and the weights of `model.safetensors`. What inference runs, and what a distilled
student's teacher is."""

from __future__ import annotations

from transferkit.errors import UserError
from transferkit.rundir.folder import RunDir
from transferkit.rundir.info import ModelInfo


def load_saved_model(folder: RunDir) -> tuple:
    """(`models.MultiTaskModel` in eval mode, the best epoch's, and its `ModelInfo`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from transferkit.models import AdapterSpec, MultiTaskModel, attach_adapter, create_backbone

    info: ModelInfo = folder.info()
    backbone = create_backbone(info.backbone, None, **info.model_kwargs)
    backbone.data_config = info.data_config
    if info.adapter:  # the saved weights include the adapter's: inject it first
        attach_adapter(backbone, AdapterSpec.from_dict(info.adapter))
    model = MultiTaskModel(backbone, info.tasks, info.aux_heads)
    try:
        load_model(model, str(folder.weights_path), strict=True)
    except SafetensorError as err:  # a truncated or corrupt file
        raise UserError(
            f"{folder.weights_path} cannot be read ({err}); train the run again"
        ) from None
    except RuntimeError as err:
        raise UserError(
            f"{folder.weights_path} does not match {folder.info_path}: "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    return model.eval(), info
