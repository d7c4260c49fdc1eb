"""OpenVINO as a deploy target: its IR (model.xml, model.bin), compiled for the CPU at a stated inference precision.

fp16 is the float32 graph with float16 weights in the IR, computed in f16 where the CPU supports it; fp32
and int8 run with f32 as the inference precision (so fp32 never silently runs in bf16 on CPUs that have it).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from onnxprune.atomic_write import save_model
from onnxprune.deploy.messages import first_line
from onnxprune.deploy.precisions import Converted
from onnxprune.deploy.runtimes import Artifact, DeployRuntime, Runner
from onnxprune.errors import InputError


class OpenVinoArtifact(Artifact):
    """A model (IR or ONNX file) compiled by OpenVINO for its CPU at one inference precision."""

    def __init__(self, label: str, path: Path, files: list[Path], *, precision_hint: str = "f32", **kwargs) -> None:
        super().__init__(label, "openvino", files, **kwargs)
        self.path, self.precision_hint = path, precision_hint

    def compile(self, threads: int, batch: int | None = None):
        """The model compiled for ``threads`` threads; with ``batch``, its free batch dimension fixed to it."""
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.path))
        if batch is not None:
            fixed = {}
            for port in model.inputs:
                shape = port.get_partial_shape()
                if shape.rank.is_static and shape.rank.get_length() and shape[0].is_dynamic:
                    shape[0] = ov.Dimension(batch)
                    fixed[port] = shape
            if fixed:
                model.reshape(fixed)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": self.precision_hint}
        return core.compile_model(model, "CPU", config)

    def open(self, threads: int, batch: int | None = None) -> Runner:
        request = self.compile(threads, batch).create_infer_request()

        def run(feed: dict[str, np.ndarray]) -> np.ndarray:
            request.infer(feed, share_inputs=True, share_outputs=True)
            return request.get_output_tensor(0).data.copy()

        return run

    def describe(self) -> dict:
        compiled = self.compile(os.cpu_count() or 1)
        return {"inference_precision_hint": self.precision_hint,
                "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                "layer_precisions": layer_precisions(compiled)}


def layer_precisions(compiled) -> dict[str, dict[str, int]]:
    """Per layer type (convolutions, fully connected, matmuls) of the compiled model, how many ran with which
    activation and weight types ("u8 activations, i8 weights": int8 kernels)."""
    found: dict[str, Counter] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in ("Convolution", "Deconvolution", "FullyConnected", "MatMul") and op.get_input_size() >= 2:
            types = [op.input(i).get_element_type().to_string() for i in (0, 1)]
            found.setdefault(kind, Counter())[f"{types[0]} activations, {types[1]} weights"] += 1
    return {kind: dict(counts) for kind, counts in found.items()}


class OpenVinoRuntime(DeployRuntime):
    """OpenVINO: the IR (model.xml, model.bin). fp16 is the float32 graph with float16 weights in the IR, computed
    in float16 where the CPU supports it; fp32 and int8 are computed with float32 as the inference precision."""

    name = "openvino"
    fp16_in_onnx = False

    def __init__(self) -> None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise InputError("--runtime openvino needs OpenVINO: pip install -e '.[deploy]'") from None
        self.compressed_to_fp16 = False

    def write(self, converted: Converted, stage: Path) -> list[Artifact]:
        import openvino as ov

        source = stage / ".converted.onnx"
        save_model(converted.model, source)
        try:
            model = ov.Core().read_model(str(source))
        except RuntimeError as e:  # OpenVINO's frontends raise RuntimeError (GeneralFailure, OpConversionFailure)
            raise InputError(f"OpenVINO {ov.get_version()} cannot read the {converted.precision} model: "
                             f"{first_line(e)}") from None
        xml = stage / "model.xml"
        self.compressed_to_fp16 = converted.precision == "fp16"
        ov.save_model(model, str(xml), compress_to_fp16=self.compressed_to_fp16)
        for leftover in (source, source.with_name(source.name + ".data")):
            leftover.unlink(missing_ok=True)
        hint = self.precision_hint(converted.precision)
        return [OpenVinoArtifact("model.xml", xml, [xml, xml.with_suffix(".bin")], precision_hint=hint)]

    def reference_rows(self, input_file: Path) -> list[Artifact]:
        return [OpenVinoArtifact("input on OpenVINO", input_file, [input_file], written=False)]

    @staticmethod
    def precision_hint(precision: str) -> str:
        """f16 for fp16 where the CPU computes in it, else f32 (also so that fp32 never runs in bf16)."""
        return "f16" if precision == "fp16" and "FP16" in cpu_capabilities() else "f32"

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {**super().versions(), "openvino": ov.get_version()}

    def details(self, stage: Path) -> dict:
        capabilities = cpu_capabilities()
        return {"openvino": {"device": "CPU", "cpu_capabilities": capabilities, "f16_compute": "FP16" in capabilities,
                             "ir_weights_compressed_to_fp16": self.compressed_to_fp16}}


def cpu_capabilities() -> list[str]:
    """OpenVINO's CPU plugin's OPTIMIZATION_CAPABILITIES (FP32, INT8, FP16, BF16, ...)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
