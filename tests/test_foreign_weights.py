"""Foreign checkpoints (declared key mappings), packaged pretrained weights, and weights errors."""

from __future__ import annotations

import threading

import timm
from safetensors.torch import save_file

from transferkit.errors import UserError
from transferkit.models import create_backbone
from transferkit.models.weights import load_into


def _returns_within(call, seconds: float = 20.0) -> BaseException | None:
    """Run `call` in a thread; fail if it has not returned in time (no pytest-timeout here)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)  # a hung thread dies with pytest
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    return outcome[0]


def test_empty_weights_file_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    error = _returns_within(lambda: create_backbone("timm:test_resnet", weights=path))
    assert isinstance(error, UserError) and f"weights file {path} holds no tensors" in str(error)

    model = timm.create_model("test_resnet", num_classes=0)
    error = _returns_within(lambda: load_into(model, {}, "empty.pth", "timm:test_resnet"))
    assert isinstance(error, UserError), error
