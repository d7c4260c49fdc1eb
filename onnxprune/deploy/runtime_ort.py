"""ONNX Runtime as a deploy target: model.onnx, model.ort (ORT format, for ORT Mobile) and required_operators.config
(the operators a reduced-size ORT build needs)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

from onnxprune.atomic_write import save_model
from onnxprune.deploy.messages import first_line
from onnxprune.deploy.precisions import Converted
from onnxprune.deploy.runtimes import Artifact, DeployRuntime, Runner
from onnxprune.errors import InputError

logger = logging.getLogger(__name__)

ORT_CONFIG = "required_operators.config"


class OrtArtifact(Artifact):
    """A model (.onnx or .ort file, or serialised bytes) on ONNX Runtime's CPU provider."""

    def __init__(self, label: str, source: Path | bytes, files: list[Path], **kwargs) -> None:
        super().__init__(label, "onnxruntime", files, **kwargs)
        self.source = source

    def open(self, threads: int, batch: int | None = None) -> Runner:
        from onnxprune.latency.target import Target

        session = Target("ort-cpu", threads).session(self.source if isinstance(self.source, bytes) else str(self.source))
        output = session.get_outputs()[0].name
        return lambda feed: session.run([output], feed)[0]


class OrtRuntime(DeployRuntime):
    """ONNX Runtime: model.onnx, model.ort (optimization style Fixed, portable) and required_operators.config."""

    name = "ort"

    def write(self, converted: Converted, stage: Path) -> list[Artifact]:
        onnx_path = stage / "model.onnx"
        save_model(converted.model, onnx_path)
        ort_path = convert_to_ort_format(onnx_path, stage)
        onnx_files = [onnx_path] + [p for p in [stage / "model.onnx.data"] if p.exists()]
        return [OrtArtifact("model.onnx", onnx_path, onnx_files),
                OrtArtifact("model.ort", ort_path, [ort_path], reference="model.onnx")]

    def details(self, stage: Path) -> dict:
        lines = (stage / ORT_CONFIG).read_text().splitlines()
        return {"ort_format": {"optimization_style": "Fixed", "optimization_level": "all",
                               "platform": "any (the x86-only NCHWc layout is not baked in)",
                               "required_operators": [line for line in lines if line and not line.startswith("#")]}}


def convert_to_ort_format(onnx_path: Path, stage: Path) -> Path:
    """model.ort and required_operators.config beside ``onnx_path``, by onnxruntime.tools (style Fixed)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    work = stage / ".ort-format"
    tools_logger = logging.getLogger("ort_format_model.utils")
    saved_level = tools_logger.level
    tools_logger.setLevel(logging.WARNING)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            convert_onnx_models_to_ort(onnx_path, output_dir=work, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputError(f"ONNX Runtime cannot convert the model to the ORT format: {first_line(e)}") from None
    finally:
        tools_logger.setLevel(saved_level)
    logger.debug("convert_onnx_models_to_ort: %s", said.getvalue().strip())
    ort_path = stage / "model.ort"
    os.replace(work / onnx_path.with_suffix(".ort").name, ort_path)
    config = next(work.glob("*.config"))
    text = config.read_text().replace(str(work.resolve() / ort_path.name), ort_path.name)
    (stage / ORT_CONFIG).write_text(text)
    shutil.rmtree(work)
    return ort_path
