"""The results store: benchmarks/results/EXPERIMENT/RUN.json, one folder per experiment, one file per run.

A run's other files sit beside its JSON under the same name: RUN.dense.onnx and RUN.pruned.onnx
(the committed MNIST models), RUN.log (what the script printed, where the JSON was written from it).
docs/experiments.md lists the experiments and how to rerun each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def experiment_folder(name: str) -> Path:
    """The folder of one experiment in the store."""
    return RESULTS / name


def add_results_argument(ap: argparse.ArgumentParser, experiment: str, more: str = "") -> None:
    """A script's --results option: the experiment's folder, by default its folder in the store."""
    ap.add_argument("--results", type=Path, default=experiment_folder(experiment),
                    help=f"the experiment's folder (default: %(default)s){more}")


def write_result(folder: Path, run: str, result: dict) -> Path:
    """Write FOLDER/RUN.json (pretty, key order kept; whole or not at all) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run}.json"
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(result, indent=2) + "\n")
    staged.replace(path)
    return path


def read_runs(folder: Path) -> list[tuple[str, dict]]:
    """(run, result) for every RUN.json in one experiment's folder, by run name."""
    return [(path.stem, json.loads(path.read_text())) for path in sorted(folder.glob("*.json"), key=lambda p: p.stem)]


def read_all(root: Path = RESULTS) -> list[tuple[str, dict]]:
    """(run, result) for every run of every experiment, by run name."""
    found = [(path.stem, path) for path in root.glob("*/*.json")]
    return [(run, json.loads(path.read_text())) for run, path in sorted(found)]


def locate(run: str, root: Path = RESULTS) -> Path | None:
    """RUN.json in whichever experiment holds it (None when no experiment does)."""
    found = sorted(root.glob(f"*/{run}.json"))
    if len(found) > 1:
        raise ValueError(f"{run} is in several experiments: {', '.join(str(p) for p in found)}")
    return found[0] if found else None


def model_file(result_path: Path, which: str) -> Path:
    """RUN.WHICH.onnx beside RUN.json (``which``: dense or pruned)."""
    return result_path.with_name(f"{result_path.stem}.{which}.onnx")


def committed_models(root: Path = RESULTS) -> list[Path]:
    """Every ONNX model in the store."""
    return sorted(root.glob("*/*.onnx"))
