"""SBP against Torch-Pruning over the seeds of one recipe: the groups, the paired statistics, their tables."""

from __future__ import annotations

import json
import math

from benchmarks.common import median
from benchmarks.report.markdown import md_table
from benchmarks.report.runs import DEFAULTS, Run, net_name

SEED_BLIND = ("seed", "tag", "note", "cuda_note", "trained_on", "baseline_macs")  # not how SBP trained
# Which SBP model each Torch-Pruning baseline matches in MACs: (what the report calls it, its key, the baseline's key)
SEED_COMPARISONS = (("shipped", "pruned", "torch_pruning"), ("posterior's", "pruned_all", "torch_pruning_posterior"))
SEED_LATENCY = (("ORT CPU batch 1", "latency_cpu", "batch1"), ("ORT CPU batch 64", "latency_cpu", "batch64"),
                ("ORT CUDA batch 1", "latency_cuda", "batch1"), ("ORT CUDA batch 256", "latency_cuda", "batch256"))


def recipe_key(cfg: dict) -> str:
    """How a run trained, seed aside: its config without the keys a seed changes, defaults filled in."""
    recorded = {k: v for k, v in cfg.items() if v is not None}
    return json.dumps({k: v for k, v in {**DEFAULTS, **recorded}.items() if k not in SEED_BLIND}, sort_keys=True)


def seed_groups(results: list[Run]) -> list[list[Run]]:
    """SBP runs compared with Torch-Pruning whose configs differ only in the seed (and tag, notes, machine), groups of
    at least two seeds, each sorted by seed."""
    groups: dict[str, list[Run]] = {}
    for run, r in results:
        if r["method"] != "sbp" or not any(theirs in r["error_pct"] for _, _, theirs in SEED_COMPARISONS):
            continue
        groups.setdefault(recipe_key(r["config"]), []).append((run, r))
    runs = [sorted(g, key=lambda x: x[1]["config"]["seed"]) for g in groups.values()]
    return [g for g in runs if len({r["config"]["seed"] for _, r in g}) >= 2]


def paired_difference(ours: list[float], theirs: list[float]) -> tuple[float, float | None, int]:
    """Per-seed differences ours - theirs: their mean, its standard error (None for one pair), and how many are < 0."""
    d = [a - b for a, b in zip(ours, theirs)]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else None
    return mean, se, sum(x < 0 for x in d)


def sign_test_p(diffs: list[float]) -> float | None:
    """Two-sided exact sign test that SBP and Torch-Pruning are equally likely to be lower (seeds with no difference
    left out): robust where one seed's gap is far from the others'. None with no nonzero difference."""
    n = sum(d != 0 for d in diffs)
    if not n:
        return None
    k = min(sum(d < 0 for d in diffs), sum(d > 0 for d in diffs))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def mean_sd(v: list[float]) -> str:
    """"mean (sd)" of the values."""
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{mean:.2f} ({sd:.2f})"


def baseline_rule(cfg: dict) -> str:
    """How the run's Torch-Pruning baseline picked its MAC count (``--baseline-rule``)."""
    return cfg.get("baseline_rule") or DEFAULTS["baseline_rule"]


def seed_comparisons(results: list[Run]) -> list[tuple[str, str, str, str, list[Run]]]:
    """(net, SBP model, its key, baseline key, runs) for every seed group and every baseline at least two of its
    seeds trained: the shipped model against Torch-Pruning at its MACs, the posterior's against Torch-Pruning at its."""
    out = []
    for seeds in seed_groups(results):
        for model, ours, theirs in SEED_COMPARISONS:
            runs = [(run, r) for run, r in seeds if theirs in r["error_pct"] and ours in r["error_pct"]]
            if len({r["config"]["seed"] for _, r in runs}) >= 2:
                rule = baseline_rule(runs[0][1]["config"])
                label = model if rule == "at-most" else f"{model}, Torch-Pruning {rule}"
                out.append((net_name(runs[0][1]["config"]), label, ours, theirs, runs))
    return out


def reduction_range(v: list[float]) -> str:
    """'1.60x to 1.63x', or '1.70x' when every seed has the same."""
    lo, hi = f"{min(v):.2f}x", f"{max(v):.2f}x"
    return lo if lo == hi else f"{lo} to {hi}"


def seeds_table(results: list[Run]) -> str:
    """Per net, SBP against Torch-Pruning over seeds of one recipe: the means, the paired difference with its
    standard error, how often SBP is lower; then every seed's row, so that one seed's gap is read against the spread."""
    summary, detail = [], []
    for net, model, ours_key, theirs_key, seeds in seed_comparisons(results):
        ours = [r["error_pct"][ours_key] for _, r in seeds]
        tp = [r["error_pct"][theirs_key] for _, r in seeds]
        mean, se, lower = paired_difference(ours, tp)
        macs = [r["macs"]["dense"] / r["macs"][ours_key] for _, r in seeds]
        tp_macs = [r["macs"]["dense"] / r["macs"][theirs_key] for _, r in seeds]
        p = sign_test_p([a - b for a, b in zip(ours, tp)])
        summary.append([net, model, len(seeds), mean_sd([r["error_pct"]["dense"] for _, r in seeds]),
                        f"**{mean_sd(ours)}**", f"**{mean_sd(tp)}**", f"{mean:+.2f} ({se:.2f})",
                        f"{lower} of {len(seeds)}", "-" if p is None else f"{p:.3f}",
                        f"{reduction_range(macs)} / {reduction_range(tp_macs)}"])
        for (run, r), a, b, m, t in zip(seeds, ours, tp, macs, tp_macs):
            detail.append([net, model, r["config"]["seed"], f"`{run}`", f"{r['error_pct']['dense']:.2f}", f"{a:.2f}",
                           f"{b:.2f}", f"{a - b:+.2f}", f"{m:.2f}x / {t:.2f}x"])
    if not summary:
        return ""
    head = ["net / data", "SBP model", "seeds", "dense error %: mean (sd)", "SBP error %: mean (sd)",
            "Torch-Pruning error % at its MACs: mean (sd)", "SBP - Torch-Pruning, paired by seed: mean (s.e.)",
            "seeds SBP is lower", "sign test p", "MAC reduction: SBP / Torch-Pruning"]
    detail_head = ["net / data", "SBP model", "seed", "run", "dense error %", "SBP error %", "Torch-Pruning error %",
                   "SBP - Torch-Pruning", "MAC reduction: SBP / Torch-Pruning"]
    return md_table(head, summary) + "\n\nSeed by seed:\n\n" + md_table(detail_head, detail)


def seeds_digest(results: list[Run]) -> str:
    """One clause per seed comparison, for the sentence under the paper table: SBP minus Torch-Pruning over seeds,
    and how often lower ("" with no seed comparison)."""
    said = []
    for net, model, ours_key, theirs_key, seeds in seed_comparisons(results):
        ours = [r["error_pct"][ours_key] for _, r in seeds]
        theirs = [r["error_pct"][theirs_key] for _, r in seeds]
        mean, se, lower = paired_difference(ours, theirs)
        p = sign_test_p([a - b for a, b in zip(ours, theirs)])
        which, _, rule = model.partition(", Torch-Pruning ")
        against = {"nearest": "the nearest reachable count"}.get(rule, "its MACs" if which == "shipped" else "most its MACs")
        said.append(f"{net}, SBP's {which} model against Torch-Pruning at {against}: {mean:+.2f} points (s.e. {se:.2f}), "
                    f"lower in {lower} of {len(seeds)} seeds" + ("" if p is None else f" (sign test p = {p:.3f})"))
    return "; ".join(said)


def seed_latency_table(results: list[Run]) -> str:
    """SBP's shipped model against each Torch-Pruning baseline over the seeds of one recipe: the paired error gap and,
    per runtime and batch, the median over seeds of Torch-Pruning's latency over SBP's (each pair timed side by side
    in one run) with the seeds where SBP's model is the faster."""
    rows = []
    for seeds in seed_groups(results):
        for theirs, macs in (("torch_pruning", "the shipped model's"), ("torch_pruning_posterior", "the posterior's")):
            runs = [r for _, r in seeds if theirs in r["error_pct"]]
            if len({r["config"]["seed"] for r in runs}) < 2:
                continue
            rule = baseline_rule(runs[0]["config"])
            mean, se, lower = paired_difference([r["error_pct"]["pruned"] for r in runs],
                                                [r["error_pct"][theirs] for r in runs])
            rows.append([net_name(runs[0]["config"]), f"at {macs} MACs" + ("" if rule == "at-most" else f" ({rule})"),
                         len(runs), f"{mean:+.2f} ({se:.2f}), {lower} of {len(runs)} lower",
                         *(_latency_ratio_cell(runs, theirs, kind, batch) for _, kind, batch in SEED_LATENCY)])
    if not rows:
        return ""
    head = ["net / data", "Torch-Pruning", "seeds", "SBP's shipped model - Torch-Pruning, error: mean (s.e.)",
            *(f"{name}: Torch-Pruning / SBP latency, median (SBP faster)" for name, _, _ in SEED_LATENCY)]
    return md_table(head, rows)


def _latency_ratio_cell(runs: list[dict], theirs: str, kind: str, batch: str) -> str:
    """The median over seeds of Torch-Pruning's latency over SBP's, and in how many seeds SBP's is the faster."""
    timed = [r[kind][batch] for r in runs if {"pruned", theirs} <= set(r.get(kind, {}).get(batch, {}))]
    ratios = [t[theirs]["median_ms"] / t["pruned"]["median_ms"] for t in timed]
    return f"{median(ratios):.2f}x ({sum(x > 1 for x in ratios)} of {len(ratios)})" if ratios else "-"
