"""deploy's choices and defaults, shared by the Python API and the command line (cheap to import)."""

from __future__ import annotations

RUNTIME_NAMES = ("ort", "openvino")
PRECISIONS = ("int8", "fp16", "fp32")
INT8_MODES = ("auto", "static", "dynamic")
DYNAMIC_RULE = ("auto: dynamic int8 when the model has no Conv and some MatMul/Gemm (MLPs, transformers: all its "
                "layer MACs are then in MatMul/Gemm), static otherwise; always static on OpenVINO, which runs "
                "dynamically quantized layers in float32")
MIN_AGREEMENT = 0.99
THREADS = 2  # the second latency column; the first is always 1 thread (the edge case)
CALIBRATION_SAMPLES = 512
TIMING_BUDGET_S = 3.0  # per thread count, all rows interleaved
