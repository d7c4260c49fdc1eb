"""README.md's own-training-loop example runs as it stands and writes a pruned model ONNX Runtime loads."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from onnxprune.runtime import make_session

README = Path(__file__).resolve().parents[1] / "README.md"
BENCHMARKS = README.parent / "BENCHMARKS.md"


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` in README.md."""
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_own_loop_example_trains_and_writes_a_pruned_model(tmp_path):
    code = readme_block("Your own training loop")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        os.chdir(cwd)
    session = make_session(str(tmp_path / "pruned.onnx"))
    name = session.get_inputs()[0].name
    (logits,) = session.run(None, {name: np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)})
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


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
