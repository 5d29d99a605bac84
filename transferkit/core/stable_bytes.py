"""Files whose bytes depend only on what they hold.

safetensors keeps a file's metadata in a Rust HashMap, whose iteration order is seeded per
process: the same tensors and metadata saved by two processes (a run and its resume) come out
with the metadata keys in different orders, so two identical models hash differently. The
header is plain JSON, so it is rewritten here with the keys sorted; its length does not change
(the same keys and values, as compact), so the tensor bytes after it stay where they are.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_METADATA = "__metadata__"


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header in a fixed order: metadata keys sorted, then the
    tensors by name. Readers see the same file; its bytes no longer depend on the process."""
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        raw = file.read(length)
        header = json.loads(raw)
        ordered = {}
        if _METADATA in header:
            ordered[_METADATA] = dict(sorted(header.pop(_METADATA).items()))
        ordered.update(sorted(header.items()))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # cannot happen for a compact header; never truncate one
            raise ValueError(f"{path}: the re-ordered safetensors header grew; left as written")
        # The format pads the header with spaces to keep the tensor data aligned.
        file.seek(8)
        file.write(text.ljust(length, b" "))
