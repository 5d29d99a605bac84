"""Artifacts whose bytes and shapes a user can rely on: a model file that hashes the same
whenever its tensors and metadata are the same, and an ONNX export that takes any batch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from transferkit.core import sort_safetensors_metadata

_SAVE = """
import sys, torch
from safetensors.torch import save_file
from transferkit.core import sort_safetensors_metadata
metadata = {f"key{i}": f"value {i}" for i in range(6)} | {"format": "pt", "note": "é/\\\\"}
save_file({"b": torch.ones(3), "a": torch.arange(5.0)}, sys.argv[1], metadata=metadata)
if sys.argv[2] == "sorted":
    sort_safetensors_metadata(sys.argv[1])
"""


def _saved_by_processes(tmp_path, mode: str, count: int = 4) -> list[bytes]:
    files = [tmp_path / f"{mode}{i}.safetensors" for i in range(count)]
    for file in files:
        subprocess.run([sys.executable, "-c", _SAVE, str(file), mode], check=True)
    return [file.read_bytes() for file in files]


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors orders metadata by a per-process hash seed: four processes saving the same
    tensors and metadata write different bytes, and the same bytes once sorted."""
    raw = _saved_by_processes(tmp_path, "raw")
    assert len({hashlib.sha256(b).hexdigest() for b in raw}) > 1  # what the sorting is for
    assert (
        len({hashlib.sha256(b).hexdigest() for b in _saved_by_processes(tmp_path, "sorted")}) == 1
    )
    file = tmp_path / "sorted0.safetensors"
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["note"] == "é/\\" and len(metadata) == 8
    tensors = load_file(str(file))
    assert torch.equal(tensors["a"], torch.arange(5.0)) and torch.equal(tensors["b"], torch.ones(3))
    header = json.loads(file.read_bytes()[8 : 8 + int.from_bytes(file.read_bytes()[:8], "little")])
    assert list(header) == ["__metadata__", "a", "b"]
    assert list(header["__metadata__"]) == sorted(metadata)


def test_sorting_is_idempotent_and_keeps_the_length(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(file), metadata={"z": "1", "a": "2"})
    size = file.stat().st_size
    sort_safetensors_metadata(file)
    once = file.read_bytes()
    sort_safetensors_metadata(file)
    assert file.read_bytes() == once and len(once) == size


def test_a_file_that_is_not_safetensors_is_left_alone(tmp_path):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{]  ")
    with pytest.raises(ValueError):
        sort_safetensors_metadata(file)
    assert file.read_bytes() == b"\x04\x00\x00\x00\x00\x00\x00\x00{]  "
