"""The paper-table runs as the report reads them: their names, recipes, costs and speed-ups.

A run is (name, result): RUN.json of benchmarks/paper_table.py in any experiment of the store. Results
written before the config was recorded whole leave out keys at their default value; ``setting`` reads both.
"""

from __future__ import annotations

from benchmarks.report.markdown import times, widths

PAPER_NAMES = {"lenet500": "LeNet-500-300", "lenet5": "LeNet5-Caffe", "vgg_cifar": "VGG-like", "resnet56": "ResNet-56",
               "lenet300": "LeNet-300-100"}
METHOD_NAMES = {"sbp": "SBP", "rbp": "RBP", "turbo-vbi": "Turbo-VBI"}
# What a config key holds where a result leaves it out (or records None): how the run trained by default
DEFAULTS = {"kl_scale": 1.0, "kl_weighting": "none", "finetune_epochs": 0, "compile": "auto", "baseline_rule": "at-most",
            "lr_restarts": None, "gate_options": {}, "tag": ""}

Run = tuple[str, dict]


def setting(cfg: dict, key: str):
    """A config value, its default where the result does not record it."""
    value = cfg.get(key)
    return DEFAULTS.get(key) if value is None else value


def paper_runs(results: list[Run]) -> list[Run]:
    """The full runs of benchmarks/paper_table.py among every result of the store (not its --quick smoke runs)."""
    return [(run, r) for run, r in results if r.get("benchmark") == "paper-table" and not r["config"].get("quick")]


def net_name(cfg: dict) -> str:
    """The paper's name of the net, its width for VGG-like, and the data: "ResNet-56 / cifar10"."""
    net = PAPER_NAMES.get(cfg["model"], cfg["model"])
    if cfg["model"] == "vgg_cifar":
        net += f" x{cfg['model_kwargs'].get('width', 1.0):g}"
    return f"{net} / {cfg['data']}"


def kl_label(cfg: dict) -> str | None:
    """"KL x<scale>" for a run trained on a tempered ELBO (``--kl-scale`` not 1), with "by MACs" when each group's
    KL was weighted by its channels' compute (``--kl-weighting macs``); None for the plain ELBO."""
    scale = setting(cfg, "kl_scale")
    text = None if scale == 1 else f"KL x{scale:g}"
    if setting(cfg, "kl_weighting") == "macs":
        text = (text or "KL") + " by MACs"
    return text


def is_variant(r: dict) -> bool:
    """A run of paper_table.py with --tag: an ablation beside the run its RUNS entry defines."""
    return bool(r["config"].get("tag"))


def speedup(lat: dict | None, batch: str, key: str) -> float | None:
    """Dense latency over the ``key`` model's at one batch size (None where not timed)."""
    if not lat or batch not in lat:
        return None
    return lat[batch]["dense"]["median_ms"] / lat[batch][key]["median_ms"]


def speedup_cells(r: dict, key: str) -> tuple[str, str]:
    """The ORT CPU (batch 1 / **64**) and ORT CUDA (batch 1 / 256) speed-up cells of a run's ``key`` model."""
    cpu, gpu = r.get("latency_cpu", {}), r.get("latency_cuda")
    cpu_s = f"{times(speedup(cpu, 'batch1', key))} / **{times(speedup(cpu, 'batch64', key))}**"
    gpu_s = f"{times(speedup(gpu, 'batch1', key))} / {times(speedup(gpu, 'batch256', key))}" if gpu else "not measured"
    return cpu_s, gpu_s


def units_cell(r: dict) -> str:
    """The posterior's widths (every rejected channel deleted), then the shipped model's where they differ."""
    units = r["units"]
    everything = widths(units.get("pruned_all", units["pruned"]))
    shipped = widths(units["pruned"])
    return everything if shipped == everything else f"{everything} ({shipped})"


def mac_cell(r: dict) -> str:
    """The posterior's MAC reduction in bold, then the shipped model's where it differs."""
    macs = r["macs"]
    everything = f"**{macs['dense'] / macs.get('pruned_all', macs['pruned']):.2f}x**"
    return everything if "pruned_all" not in macs or macs["pruned_all"] == macs["pruned"] else \
        f"{everything} ({macs['dense'] / macs['pruned']:.2f}x)"


def epochs_cell(cfg: dict) -> str:
    """The Bayesian epochs, and how many of the last ones fine-tuned the gate-folded net (``--finetune-epochs``)."""
    tuned = setting(cfg, "finetune_epochs")
    return f"{cfg['epochs']} (last {tuned} fine-tuning)" if tuned else str(cfg["epochs"])


def reduction(r: dict) -> float:
    """MAC reduction with every rejected channel deleted."""
    return r["macs"]["dense"] / r["macs"].get("pruned_all", r["macs"]["pruned"])


def best_cpu(r: dict) -> float | None:
    """The better of the run's ORT CPU speed-ups at batch 1 and 64."""
    cpu = r.get("latency_cpu", {})
    found = [s for s in (speedup(cpu, "batch1", "pruned"), speedup(cpu, "batch64", "pruned")) if s is not None]
    return max(found) if found else None


def within_paper(r: dict) -> float | None:
    """The highest test error % that meets the paper's row: its error (MNIST), or our dense error plus the paper's
    loss over its dense net (CIFAR, where the JPEG copy shifts every error)."""
    paper = r.get("paper", {})
    if "error" not in paper:
        return None
    if "dense_error" in paper:
        return r["error_pct"]["dense"] + paper["error"] - paper["dense_error"]
    return paper["error"]


def best_within_paper(results: list[Run]) -> dict[str, Run | None]:
    """Per net of the paper: of its SBP runs (any variant) whose error meets the paper's, the one with the largest
    MAC reduction (None when no run meets the error)."""
    best: dict[str, Run | None] = {}
    for net in dict.fromkeys(net_name(r["config"]) for _, r in results):
        rs = [(run, r) for run, r in results if net_name(r["config"]) == net and r["method"] == "sbp"]
        bound = next((within_paper(r) for _, r in rs if within_paper(r) is not None), None)
        if bound is None:
            continue
        ok = [(run, r) for run, r in rs if r["error_pct"]["pruned"] <= bound + 1e-9]
        best[net] = max(ok, key=lambda item: reduction(item[1])) if ok else None
    return best


def longest_runs(results: list[Run]) -> list[Run]:
    """One row per (net, method): the longest schedule (a net retrained for longer keeps its shorter run for
    the same-budget methods table)."""
    best: dict[tuple[str, str], Run] = {}
    for run, r in results:
        key = (net_name(r["config"]), r["method"])
        rank = (r["config"]["epochs"], not is_variant(r))  # at equal epochs, the run RUNS defines
        if key not in best or rank > (best[key][1]["config"]["epochs"], not is_variant(best[key][1])):
            best[key] = (run, r)
    return [item for item in results if item in best.values()]
