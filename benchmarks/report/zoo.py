"""Every MNIST/CIFAR-10 architecture through RBP and Turbo-VBI (benchmarks/methods_zoo.py): the export's check.

A zoo may be split over several result files (a lease split over GPUs, finished on a CPU): the report
reads them as one table, in the registry's order.
"""

from __future__ import annotations

from benchmarks.report.markdown import machine_line, md_table
from benchmarks.report.runs import METHOD_NAMES

Entry = tuple[dict, dict, dict]  # a zoo file's config, one of its rows, its machine


def zoo_options(config: dict, method: str) -> str:
    """A zoo run's gate options for one method, as `key=value`, with its gate learning rate where one was given
    (or the method's defaults)."""
    options = dict(config.get("gate_options", {}).get(method, {}))
    if method in config.get("gate_lr", {}):
        options["gate lr"] = config["gate_lr"][method]
    return ", ".join(f"{k}={v:g}" for k, v in sorted(options.items())) or "defaults"


def tf32(config: dict) -> bool:
    """Whether a zoo run on CUDA took the wrapped net's predictions with TF32 convolutions (before 2026-11-22's fix)."""
    return config["device"].startswith("cuda") and "torch_eval_precision" not in config


def zoo_entries(zoos: list[dict]) -> list[Entry]:
    """Every row of every zoo file, in the registry's order of models, then by method, options and device."""
    import models

    names = list(models.REGISTRY) + [m for z in zoos for m in z["config"].get("models", []) if m not in models.REGISTRY]
    order = {m: i for i, m in enumerate(dict.fromkeys(names))}
    entries = [(z["config"], r, z["machine"]) for z in zoos for r in z["rows"]]
    return sorted(entries, key=lambda e: (order.get(e[1]["model"], len(order)), e[1]["method"],
                                          zoo_options(e[0], e[1]["method"]), e[0]["device"]))


def missing_runs(zoos: list[dict]) -> list[str]:
    """The (model, method, options) some zoo file planned and no zoo file holds."""
    planned, done = [], set()
    for z in zoos:
        c = z["config"]
        for m in c.get("models", []):
            planned += [(m, k, zoo_options(c, k)) for k in c.get("methods", [])]
        done |= {(r["model"], r["method"], zoo_options(c, r["method"])) for r in z["rows"]}
    return [f"{m} / {METHOD_NAMES[k]} ({o})" for m, k, o in dict.fromkeys(planned) if (m, k, o) not in done]


def _pct(v: float | None) -> str:
    """A share as a percentage ("–" where not recorded)."""
    return "–" if v is None else f"{100 * v:.2f}"


def zoo_table(entries: list[Entry]) -> str:
    """One row per model, method and options: the errors on both runtimes and the pruned model's agreement."""
    kl_scales = [c.get("kl_scale", 1) for c, _, _ in entries]
    usual_kl = max(set(kl_scales), key=kl_scales.count) if kl_scales else 1

    def options(c: dict, method: str) -> str:  # a zoo trained with another KL weight than most says so
        text, kl = zoo_options(c, method), c.get("kl_scale", 1)
        return text if kl == usual_kl else f"{text}, **KL x{kl:g}**" if kl != 1 else f"{text}, **the plain ELBO**"

    rows = [[f"`{r['model']}`", r["data"], METHOD_NAMES[r["method"]], options(c, r["method"]),
             f"{r['train_images']} on {c['device'].split(':')[0].upper()}", _pct(r.get("dense_error_torch")),
             _pct(r["dense_error_onnx"]), _pct(r["wrapped_error_torch"]), _pct(r["pruned_error_onnx"]),
             f"**{100 * r['agreement_with_wrapped']:.2f} %**" + (" (TF32)" if tf32(c) else ""),
             f"{r['channels_kept']} / {r['channels_gated']}",
             f"{r['macs']['dense'] / r['macs']['pruned']:.2f}x", f"{r['seconds']:.0f}"] for c, r, _ in entries]
    head = ["model", "data", "method", "gate options", "train images", "dense error % (PyTorch)", "dense error % (ORT)",
            "wrapped error % (PyTorch)", "pruned error % (ORT)", "pruned predicts as wrapped", "channels kept / gated",
            "MAC reduction", "seconds"]
    return md_table(head, rows)


def _budgets(entries: list[Entry]) -> str:
    """The zoos' budgets: dense and Bayesian epochs and the KL term of each."""
    budgets = sorted({(c["pretrain_epochs"], c["epochs"], c.get("kl_scale", 1), c.get("kl_weighting", "none"))
                      for c, _, _ in entries})
    return "; ".join(f"{p} dense and {e} Bayesian epochs" + (f", KL x{k:g}" + (" by MACs" if w == "macs" else "")
                                                             if k != 1 else ", the plain ELBO") for p, e, k, w in budgets)


def zoo_values(zoos: list[dict]) -> dict:
    """The methods-zoo section's values for the report's template."""
    entries = zoo_entries(zoos)
    exact = [r for c, r, _ in entries if not tf32(c)]
    notes = list(dict.fromkeys(z["note"] for z in zoos if z.get("note")))
    return {
        "budgets": _budgets(entries),
        "dense_columns": any("dense_error_torch" in r for _, r, _ in entries),
        "machines": "; ".join(sorted({machine_line({**m, "date": m.get("date", "")[:10]}) for _, _, m in entries})),
        "tf32": any(tf32(c) for c, _, _ in entries),
        "exact_agree": len(exact) if exact and all(r["agreement_with_wrapped"] == 1.0 for r in exact) else 0,
        "gate_lr": any(c.get("gate_lr") for c, _, _ in entries),
        "notes": " ".join(f"({i}) {n}." for i, n in enumerate(notes, 1)),
        "missing": ", ".join(missing_runs(zoos)),
        "table": zoo_table(entries),
    }
