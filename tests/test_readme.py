"""README.md's own-training-loop example runs as it stands and writes a pruned model ONNX Runtime runs
as the wrapped model computes; its results table agrees with BENCHMARKS.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from onnxprune.runtime import make_session

README = Path(__file__).resolve().parents[1] / "README.md"
BENCHMARKS = README.parent / "BENCHMARKS.md"


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` in README.md."""
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_own_loop_example_trains_and_writes_a_pruned_model(tmp_path):
    code = readme_block("Your own training loop")
    namespace = {"__name__": "readme_example"}
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(tmp_path)
    torch.set_num_threads(1)  # on a shared, busy CPU, intra-op threads wait on each other: 5-10x slower steps
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    path = tmp_path / "pruned.onnx"
    assert path.is_file()
    session = make_session(str(path))
    x = namespace["x"][:16]
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = namespace["model"].eval()(x).numpy()  # the wrapped model, gates at their posterior means
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def results_table() -> list[str]:
    section = README.read_text().split("## Results\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| [")]


def test_every_readme_results_row_links_to_a_benchmarks_section_that_exists():
    headings = [line.lstrip("#").strip() for line in BENCHMARKS.read_text().splitlines() if line.startswith("#")]
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    links = [m.group(1) for row in results_table() for m in re.finditer(r"BENCHMARKS\.md#([\w-]+)", row)]
    assert len(links) == len(results_table()) >= 5
    assert set(links) <= anchors, set(links) - anchors


def test_every_figure_in_the_readme_results_table_stands_in_benchmarks():
    report = BENCHMARKS.read_text()
    figures = {f for row in results_table() for f in re.findall(r"\b\d+\.\d+x?", row.split("](", 1)[1])}
    missing = sorted(f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", report))
    assert not missing, f"README figures with no BENCHMARKS.md row: {missing}"
