"""ONNX Runtime CUDA latency, inputs and outputs bound on the device, models timed side by side."""

from __future__ import annotations

import numpy as np


def cuda_latency(files: dict, shape: tuple[int, ...], *, rounds: int = 30) -> dict:
    """Median ms per model for one input of ``shape`` (IO binding: no host copies in the timing)."""
    import onnxruntime

    from onnxprune.latency.timing import interleaved
    from onnxprune.runtime import session_options

    x = onnxruntime.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32), "cuda", 0)
    runners = {}
    for key, path in files.items():
        so = session_options()  # joins the process-wide CPU pool when one is set up
        session = onnxruntime.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, x)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")
        runners[key] = lambda s=session, b=binding: s.run_with_iobinding(b)
    return {k: t.to_dict() for k, t in interleaved(runners, repeats=rounds, warmup=5).items()}
