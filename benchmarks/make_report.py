"""Render BENCHMARKS.md: the prose of benchmarks/report/template.md, filled from the results store.

    python -m benchmarks.make_report

Every figure comes from a run's JSON file under benchmarks/results/ (one folder per experiment); the
sentences are edited in the template, the tables and figures computed by benchmarks/report/.
"""

from __future__ import annotations

import logging

from benchmarks.common import ROOT
from benchmarks.report.markdown import machine_line
from benchmarks.report.methods import methods_table, schedule_note
from benchmarks.report.paper import paper_table, scoreboard_table, shapes_latency_table, shapes_machine, variants_table
from benchmarks.report.plots import plot_error_vs_macs, plot_seeds
from benchmarks.report.runs import Run, best_within_paper, is_variant, longest_runs, paper_runs
from benchmarks.report.sections import SECTIONS
from benchmarks.report.seeds import seed_latency_table, seeds_digest, seeds_table
from benchmarks.report.template import render_file
from benchmarks.report.zoo import zoo_values
from benchmarks.store import RESULTS, experiment_folder, read_all, read_runs

log = logging.getLogger("benchmarks.make_report")
FIGURES = experiment_folder("paper-table")


def paper_values(paper: list[Run]) -> dict:
    """The paper table's section: its tables, its notes, and the error-against-MACs figure (drawn here)."""
    canonical = [(run, r) for run, r in paper if not is_variant(r)]
    best = {net: picked for net, picked in best_within_paper(paper).items() if picked is not None}
    other_methods = [item for item in paper if is_variant(item[1]) and item[1]["method"] != "sbp"]
    plot_error_vs_macs(longest_runs(canonical + other_methods), FIGURES / "paper_error_vs_macs.png", extra=best)
    sbp = [(run, r) for run, r in longest_runs(canonical) if r["method"] == "sbp"]
    cuda = next((r["machine_cuda"] for _, r in paper if r.get("machine_cuda")), None)
    return {"table": paper_table(sbp), "scoreboard": scoreboard_table(paper), "variants": variants_table(paper),
            "methods": methods_table(paper), "notes": [schedule_note(run, r) for run, r in paper],
            "cuda_machine": machine_line(cuda).removeprefix("Measured on: ") if cuda else "not measured"}


def seeds_values(paper: list[Run]) -> dict:
    """The seeds section: SBP against Torch-Pruning over the seeds of each recipe, and its figure (drawn here)."""
    if not plot_seeds(paper, FIGURES / "paper_seeds.png"):
        log.warning("no recipe has several seeds: %s not drawn", FIGURES / "paper_seeds.png")
    return {"digest": seeds_digest(paper), "table": seeds_table(paper), "latency_table": seed_latency_table(paper)}


def shapes_values(paper: list[Run]) -> dict:
    """The CIFAR models rebuilt and timed on a 2-core machine."""
    machine = shapes_machine(paper)
    return {"machine": machine_line(machine) if machine else "not measured", "table": shapes_latency_table(paper)}


def report_values() -> dict:
    """Every value the template reads, from the results store."""
    paper = paper_runs(read_all())
    values = {"paper": paper_values(paper), "seeds": seeds_values(paper), "shapes": shapes_values(paper),
              "zoo": zoo_values([r for _, r in read_runs(experiment_folder("methods-zoo"))])}
    for experiment, section in SECTIONS.items():
        values[experiment] = [section(run, r) for run, r in read_runs(experiment_folder(experiment))]
    return values


def main() -> None:
    """Write BENCHMARKS.md (and the figures it shows)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = ROOT / "BENCHMARKS.md"
    out.write_text(render_file("template.md", report_values()).rstrip() + "\n")
    log.info("wrote %s from %s", out, RESULTS)


if __name__ == "__main__":
    main()
