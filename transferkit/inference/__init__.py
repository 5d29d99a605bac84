"""Deployment: a trained model predicting new images.

- `run`: a run folder's model in torch (`load`, `Run`, test-time views, calibrated temperatures);
- `onnx_run`: an exported ONNX file through onnxruntime, with no torch (`load_onnx`, `OnnxRun`);
- `predictions`: what a prediction says and how inputs are read, shared by both (torch-free);
- `table`: predictions of a folder written to CSV or Parquet, resumable.

Names are imported on first use, so the ONNX path never imports torch.
"""

from transferkit.core import lazy_exports

_WHERE = {
    "AdjustedModel": "transferkit.inference.run",
    "Run": "transferkit.inference.run",
    "load": "transferkit.inference.run",
    "parse_tta": "transferkit.inference.run",
    "resolve_device": "transferkit.inference.run",
    "FORMAT_VERSION": "transferkit.inference.onnx_run",
    "INPUT_NAME": "transferkit.inference.onnx_run",
    "METADATA_KEY": "transferkit.inference.onnx_run",
    "OnnxRun": "transferkit.inference.onnx_run",
    "is_onnx_file": "transferkit.inference.onnx_run",
    "load_onnx": "transferkit.inference.onnx_run",
    "Predictor": "transferkit.inference.predictions",
    "describe_prediction": "transferkit.inference.predictions",
    "image_files": "transferkit.inference.predictions",
    "read_image": "transferkit.inference.predictions",
    "write_predictions": "transferkit.inference.table",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
