"""Deploy a float32 ONNX model to an edge runtime: int8/fp16/fp32, ORT format or OpenVINO IR, checked on data, timed.

``onnxprune.deploy.deploy(model, out_dir, runtime="ort", precision="int8", calibration="mnist")`` returns a
DeployResult; ``onnxprune deploy`` is the command. ``KeepFloat`` is the extension point naming layers that
int8 leaves in float32.
"""

from __future__ import annotations

__all__ = ["deploy", "DeployResult", "KeepFloat", "AgreementError"]


def __getattr__(name: str):
    # Imported lazily: the command line reads onnxprune.deploy.options without loading the runtimes.
    if name in ("deploy", "DeployResult"):
        from onnxprune.deploy import api

        return getattr(api, name)
    if name == "KeepFloat":
        from onnxprune.deploy.keep_float import KeepFloat

        return KeepFloat
    if name == "AgreementError":
        from onnxprune.deploy.checks import AgreementError

        return AgreementError
    raise AttributeError(f"module 'onnxprune.deploy' has no attribute {name!r}")
