"""The benchmark scripts run end to end as `python -m benchmarks.NAME`, and the report's tables and statistics read
their results (the ResNet-50 one is slow: opt-in with `pytest -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m benchmarks.NAME ARGS`` from the repository's root."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_engine_benchmark_runs_quick_variant(tmp_path):
    done = script("prune_resnet50", "--quick", "--repeats", "1", "--latency-runs", "3", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "prune-resnet50-quick.json").read_text())
    assert result["torch_pruning"]["same_widths_as_onnxprune"]
    assert result["macs"]["onnxprune"] == result["macs"]["torch_pruning"] < result["macs"]["dense"]


def test_paper_table_runs_a_tagged_variant_end_to_end(tmp_path):
    """--quick: 1024 training images, 2 epochs; the authors' recipe flags, a gate option, a shared dense folder."""
    done = script("paper_table", "mnist-lenet5", "--quick", "--rounds", "2", "--placement", "pre-bias", "--noise", "batch",
                  "--schedule", "step-linear", "--gate-option", "a=-20", "--tag", "smoke", "--work", str(tmp_path / "work"),
                  "--dense-dir", str(tmp_path / "dense"), "--results", str(tmp_path / "results"), "--quiet",
                  "--no-baseline")  # Torch-Pruning: a benchmark extra
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results"
    result = json.loads((out / "mnist-lenet5-sbp-smoke.json").read_text())
    assert result["config"]["tag"] == "smoke" and result["config"]["placement"] == "pre-bias"
    assert result["config"]["gate_options"] == {"a": -20} and result["config"]["baseline_macs"] is None
    assert set(result["macs"]) == {"dense", "pruned", "pruned_all"}
    assert result["macs"]["pruned_all"] <= result["macs"]["pruned"] <= result["macs"]["dense"]
    assert not list(out.glob("*.onnx"))  # a variant keeps only its result file
    assert (tmp_path / "dense" / "dense_final.pt").exists()
    assert result["agreement_with_wrapped"]["pruned_all"] >= 0.998  # 512 test images: at most one flip


@pytest.mark.slow
def test_paper_table_trains_torch_pruning_to_the_shipped_and_the_posteriors_macs(tmp_path):
    """--baseline-macs shipped posterior: two baselines from one dense net, each at most the MACs of its SBP model,
    both measured on ONNX Runtime and named in the config (Torch-Pruning is a benchmark extra: `pip install -e
    '.[bench]'`, then `pytest -m slow`)."""
    pytest.importorskip("torch_pruning")
    done = script("paper_table", "mnist-lenet5", "--quick", "--rounds", "2", "--gate-option", "a=-20", "--baseline-macs",
                  "shipped", "posterior", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "mnist-lenet5-sbp.json").read_text())
    macs, errors = result["macs"], result["error_pct"]
    assert macs["torch_pruning"] <= macs["pruned"] and macs["torch_pruning_posterior"] <= macs["pruned_all"]
    assert macs["torch_pruning_posterior"] > 0.8 * macs["pruned_all"]
    assert {"torch_pruning", "torch_pruning_posterior"} <= set(errors)
    assert result["config"]["baseline_macs"] == ["shipped", "posterior"]
    assert {"torch_pruning_s", "torch_pruning_posterior_s"} <= set(result["stage_times_s"])


# RBP's noise starts near its threshold so that six quick epochs reject channels; Turbo-VBI rejects none this
# early (its rejection is tested in test_bayes_wrap.py), the run still checks the model it ships.
@pytest.mark.parametrize("method, options", [("rbp", ["--gate-option", "init_log_alpha=2.5"]),
                                             ("turbo-vbi", ["--gate-option", "update_every=4"])])
def test_paper_table_trains_rbp_and_turbo_vbi_into_a_pruned_model_that_agrees_with_the_wrapped_one(tmp_path, method, options):
    done = script("paper_table", "mnist-lenet5", "--method", method, "--quick", "--epochs", "6", *options, "--rounds", "2",
                  "--tag", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--quiet",
                  "--no-baseline")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / f"mnist-lenet5-{method.replace('-', '')}-smoke.json").read_text())
    assert result["method"] == method
    assert result["agreement_with_wrapped"]["pruned"] >= 0.998 and result["agreement_with_wrapped"]["pruned_all"] >= 0.998
    assert abs(result["error_pct"]["wrapped_torch"] - result["error_pct"]["pruned_all"]) <= 0.2
    if method == "rbp":
        assert sum(result["units"]["pruned_all"]) < sum(result["units"]["dense"])


def test_cpu_latency_shapes_rebuilds_a_vgg_run_with_its_shipped_widths():
    """The rebuilt models of a committed CIFAR run: the dense net's widths, and exactly the shipped ones."""
    from benchmarks.cpu_latency_shapes import rebuild
    from benchmarks.store import locate
    from tests.prune_helpers import layer_widths

    result = json.loads(locate("cifar-vgg-sbp").read_text())
    dense, pruned = rebuild(result)
    assert [w[1] for w in layer_widths(dense).values()][:-1] == result["units"]["dense"]
    assert [w[1] for w in layer_widths(pruned).values()][:-1] == result["units"]["pruned"]


def test_cpu_latency_shapes_plans_widths_here_between_the_posteriors_and_the_dense():
    """--plan-here: onnxprune's ORT CPU planner, run here, keeps every surviving channel and drops only dead ones."""
    from benchmarks.cpu_latency_shapes import rebuild
    from tests.prune_helpers import layer_widths

    dense_widths = [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128, 128]
    alive = [5, 16, 9, 32, 40, 64, 17, 100, 3, 128, 60, 1, 128, 77]
    result = {"run": "tiny-vgg", "config": {"model": "vgg_cifar", "model_kwargs": {"width": 0.25}},
              "units": {"dense": dense_widths, "pruned_all": alive}}
    dense, planned = rebuild(result, "pruned_all", target="ort-cpu", batch=1)
    assert [w[1] for w in layer_widths(dense).values()][:-1] == dense_widths
    widths = [w[1] for w in layer_widths(planned).values()][:-1]
    assert all(a <= w <= d for a, w, d in zip(alive, widths, dense_widths)), widths
    assert sum(widths) < sum(dense_widths)


def test_methods_zoo_trains_exports_and_reports_agreement(tmp_path):
    """benchmarks/methods_zoo.py on one MNIST net and both alternative methods: the pruned ONNX model predicts as
    the wrapped net on the whole test set, and the report renders the rows."""
    proc = script("methods_zoo", "--models", "lenet300", "--train-limit", "600", "--pretrain-epochs", "1", "--epochs", "2",
                  "--kl-scale", "50", "--work", str(tmp_path / "work"), "--results", str(tmp_path), "--run", "zoo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    zoo = json.loads((tmp_path / "zoo.json").read_text())
    rows = zoo["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [("lenet300", "rbp"), ("lenet300", "turbo-vbi")]
    for r in rows:
        assert r["test_images"] == 10000 and r["train_images"] == 600
        assert r["agreement_with_wrapped"] >= 0.999
        assert abs(r["wrapped_error_torch"] - r["pruned_error_onnx"]) <= 0.001
    from benchmarks.report.zoo import zoo_values

    values = zoo_values([zoo])
    assert "`lenet300`" in values["table"] and "RBP" in values["table"] and "Turbo-VBI" in values["table"]
    assert values["budgets"] == "1 dense and 2 Bayesian epochs, KL x50" and not values["missing"]


def _zoo(models, methods, rows, device="cpu", gate_options=None) -> dict:
    """A methods-zoo result: the models and methods it planned, the (model, method) rows it finished."""
    row = {"data": "mnist", "train_images": 100, "test_images": 10000, "dense_error_onnx": 0.1,
           "wrapped_error_torch": 0.1, "pruned_error_onnx": 0.1, "agreement_with_wrapped": 1.0, "channels_kept": 3,
           "channels_gated": 4, "macs": {"dense": 4, "pruned": 2}, "params": {"dense": 4, "pruned": 2}, "seconds": 1}
    config = {"train_limit": 100, "pretrain_epochs": 1, "epochs": 2, "device": device, "seed": 0, "kl_scale": 1.0,
              "kl_weighting": "none", "gate_options": gate_options or {}, "models": models, "methods": methods}
    return {"benchmark": "methods-zoo", "machine": {"cpu": "x"}, "config": config,
            "rows": [{**row, "model": m, "method": k} for m, k in rows]}


def test_zoo_merges_split_files_and_names_only_the_runs_no_file_finished():
    """A zoo split over GPUs and finished elsewhere is one table in registry order; a planned run is reported
    missing only when no file holds it with the same gate options."""
    from benchmarks.report.zoo import zoo_values

    a = _zoo(["lenet300", "lenet500", "lenet5"], ["rbp"], [("lenet5", "rbp")], device="cuda")
    b = _zoo(["lenet300", "lenet500"], ["rbp"], [("lenet300", "rbp")])
    c = _zoo(["lenet300"], ["turbo-vbi"], [], gate_options={"turbo-vbi": {"prior_weight": 0.01}})
    d = _zoo(["lenet5"], ["rbp"], [("lenet5", "rbp")])
    d["config"]["gate_lr"] = {"rbp": 0.15}
    values = zoo_values([a, b, c, d])
    table = values["table"]
    assert "gate lr=0.15" in table and values["gate_lr"]
    assert table.index("`lenet300`") < table.index("`lenet5`")
    assert values["missing"] == "lenet500 / RBP (defaults), lenet300 / Turbo-VBI (prior_weight=0.01)"
    assert "(TF32)" in table and values["tf32"]  # the CUDA file predates the float32 predictions


@pytest.mark.parametrize("args, expected", [(["--gate-option", "prior_weight=0.1"], "METHOD.KEY=VALUE"),
                                            (["--gate-lr", "0.1"], "METHOD=LR"), (["--gate-lr", "rbp=fast"], "not a number")])
def test_methods_zoo_rejects_a_malformed_gate_option_or_gate_lr(args, expected):
    proc = script("methods_zoo", *args, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr


@pytest.mark.slow  # about 75 s of torch.compile on 2 cores: a benchmark's smoke test, opt-in (make test-all)
def test_rbp_compile_compiles_fewer_graphs_when_the_gates_read_their_stage_as_data(tmp_path):
    """benchmarks/rbp_compile.py on LeNet5 (3 stages over 3 epochs): the gates that read their stage as data compile
    fewer graphs than gates branching on it, which compile one per stage; the report renders both rows."""
    proc = script("rbp_compile", "--epochs", "3", "--train-limit", "256", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "rbp-compile-lenet5-cpu.json").read_text())
    data, branches = (next(x for x in r["rows"] if x["mode"] == m) for m in ("data", "branches"))
    assert data["stages"] == branches["stages"] == 3
    assert data["graphs_compiled"] < branches["graphs_compiled"]
    from benchmarks.report.sections import rbp_compile

    assert "state as data" in rbp_compile("rbp-compile-lenet5-cpu", r)["table"]


def _paper_result(seed, ours, theirs, tag="", kl_scale=10.0, posterior=None):
    config = {"model": "resnet56", "model_kwargs": {}, "data": "cifar10", "epochs": 24, "kl_scale": kl_scale,
              "seed": seed, "tag": tag, "note": f"lease {seed}"}
    r = {"benchmark": "paper-table", "method": "sbp", "config": config,
         "error_pct": {"dense": 9.8, "pruned": ours, "pruned_all": ours, "torch_pruning": theirs},
         "macs": {"dense": 150, "pruned": 100, "pruned_all": 75, "torch_pruning": 98}}
    if posterior is not None:  # a Torch-Pruning baseline at the posterior's MACs too (--baseline-macs)
        config["baseline_macs"] = ["shipped", "posterior"]
        r["error_pct"]["torch_pruning_posterior"], r["macs"]["torch_pruning_posterior"] = posterior, 74
    return r


def test_seeds_table_pairs_sbp_with_torch_pruning_seed_by_seed_and_leaves_out_other_recipes(tmp_path):
    """Runs differing only in seed, tag and note form one group: the mean paired difference, its standard error and
    how many seeds SBP is lower; a run of another recipe, or a recipe with one seed, is not in the table."""
    from benchmarks.report.plots import plot_seeds
    from benchmarks.report.seeds import paired_difference, seeds_table

    results = [("a", _paper_result(0, 10.4, 10.5)), ("b", _paper_result(1, 10.3, 10.2, tag="seed1")),
               ("c", _paper_result(2, 10.1, 10.4, tag="seed2")), ("other", _paper_result(0, 9.0, 12.0, kl_scale=5.0))]
    mean, se, lower = paired_difference([10.4, 10.3, 10.1], [10.5, 10.2, 10.4])
    assert round(mean, 6) == -0.1 and lower == 2
    assert se == pytest.approx((((0.0) ** 2 + 0.2 ** 2 + 0.2 ** 2) / 2 / 3) ** 0.5)
    table = seeds_table(results)
    assert "| 3 |" in table and "-0.10 (0.12)" in table and "2 of 3" in table
    assert "`other`" not in table and "1.50x / 1.53x" in table
    assert plot_seeds(results, tmp_path / "seeds.png") and (tmp_path / "seeds.png").stat().st_size > 0
    assert seeds_table(results[:1] + results[3:]) == "" and not plot_seeds(results[:1], tmp_path / "none.png")
    assert "posterior's" not in table


def test_seeds_table_compares_the_posteriors_model_where_two_seeds_trained_a_baseline_at_its_macs():
    """A baseline at the posterior's MACs (--baseline-macs posterior) leaves the shipped comparison's group as it is
    and adds a row for the seeds that have it."""
    from benchmarks.report.seeds import seeds_table

    results = [("a", _paper_result(0, 10.4, 10.5)), ("b", _paper_result(1, 10.3, 10.2, posterior=10.9)),
               ("c", _paper_result(2, 10.1, 10.4, posterior=10.6))]
    summary = seeds_table(results).split("Seed by seed")[0]
    assert "| shipped | 3 |" in summary and "| posterior's | 2 |" in summary
    assert "-0.55 (0.05)" in summary and "2 of 2" in summary and "2.00x / 2.03x" in summary


def test_sign_test_counts_the_seeds_each_side_and_leaves_out_ties():
    """Two-sided exact binomial: 11 of 12 seeds lower gives 26/4096; a seed with no difference is left out."""
    from benchmarks.report.seeds import sign_test_p

    assert sign_test_p([-0.1] * 11 + [0.5]) == pytest.approx(2 * 13 / 4096)
    assert sign_test_p([-0.1] * 11 + [0.5, 0.0]) == pytest.approx(2 * 13 / 4096)
    assert sign_test_p([-0.1, 0.1]) == 1.0 and sign_test_p([0.0, 0.0]) is None


def _timed(**ms):
    return {name: {"median_ms": v} for name, v in ms.items()}


def test_seed_latency_table_gives_the_median_latency_ratio_and_the_seeds_sbp_is_faster():
    """Per baseline with two seeds or more: Torch-Pruning's latency over SBP's shipped model's, the median over seeds
    and how many seeds SBP's is the faster; a runtime no run timed reads '-'."""
    from benchmarks.report.seeds import seed_latency_table

    results = []
    for seed, ours, theirs, cpu_tp in ((0, 10.4, 10.5, 1.2), (1, 10.3, 10.2, 0.9), (2, 10.1, 10.4, 1.5)):
        r = _paper_result(seed, ours, theirs, tag=f"seed{seed}" if seed else "")
        r["latency_cpu"] = {"batch1": _timed(dense=1.5, pruned=1.0, torch_pruning=cpu_tp)}
        results.append((f"r{seed}", r))
    table = seed_latency_table(results)
    assert "| at the shipped model's MACs | 3 | -0.10 (0.12), 2 of 3 lower | 1.20x (2 of 3) | - |" in table
    assert "posterior" not in table and seed_latency_table(results[:1]) == ""


def test_seeds_table_keeps_runs_whose_baseline_took_the_nearest_macs_apart_and_says_so():
    """Seeds trained only against Torch-Pruning at the posterior's MACs, by the nearest reachable count
    (--baseline-macs posterior --baseline-rule nearest), form their own row, named by that rule."""
    from benchmarks.report.seeds import seeds_table

    nearest = []
    for seed, ours, theirs in ((16, 10.2, 10.5), (17, 10.3, 10.4)):
        r = _paper_result(seed, ours, 0.0, tag=f"seed{seed}", posterior=theirs)
        del r["error_pct"]["torch_pruning"], r["macs"]["torch_pruning"]
        r["config"].update(baseline_macs=["posterior"], baseline_rule="nearest")
        nearest.append((f"n{seed}", r))
    results = [("b", _paper_result(1, 10.3, 10.2, posterior=10.9)), ("c", _paper_result(2, 10.1, 10.4, posterior=10.6))]
    summary = seeds_table(results + nearest).split("Seed by seed")[0]
    assert "| posterior's | 2 |" in summary and "| posterior's, Torch-Pruning nearest | 2 |" in summary
    assert "-0.20 (0.10)" in summary and summary.count("| shipped |") == 1


def test_seeds_digest_names_each_comparison_and_its_baseline_rule():
    """The sentence under the paper table: one clause per seed comparison, the baseline's MACs named by its rule."""
    from benchmarks.report.seeds import seeds_digest

    results = [("b", _paper_result(1, 10.3, 10.2, posterior=10.9)), ("c", _paper_result(2, 10.1, 10.4, posterior=10.6))]
    digest = seeds_digest(results)
    assert "SBP's shipped model against Torch-Pruning at its MACs: -0.10 points" in digest
    assert "SBP's posterior's model against Torch-Pruning at most its MACs: -0.55 points (s.e. 0.05), lower in 2 of 2" in digest
    assert seeds_digest(results[:1]) == ""


def test_seed_groups_pair_results_that_record_every_config_key_with_those_that_leave_defaults_out():
    """paper_table.py now records its whole config (kl_weighting "none", compile "auto", ...); earlier results left
    those keys out: a seed of either kind is one recipe."""
    from benchmarks.report.seeds import seed_groups

    old = _paper_result(1, 10.3, 10.2)
    new = _paper_result(2, 10.1, 10.4, tag="seed2")
    new["config"].update(kl_weighting="none", compile="auto", finetune_epochs=0, gate_options={}, lr_restarts=None,
                         baseline_rule="at-most", cuda_note=None)
    other = _paper_result(3, 10.0, 10.1, tag="seed3")
    other["config"]["kl_weighting"] = "macs"
    groups = seed_groups([("old", old), ("new", new), ("other", other)])
    assert [[run for run, _ in g] for g in groups] == [["old", "new"]]


def test_template_fills_values_keeps_blocks_by_their_truth_and_repeats_a_list():
    from benchmarks.report.template import render

    text = "{{title}}: {{#ok}}met{{/ok}}{{^ok}}**not met**{{/ok}}.{{*runs}} {{name}} {{n.x}}{{#last}}!{{/last}}{{/runs}}"
    values = {"title": "Targets", "ok": False, "runs": [{"name": "a", "n": {"x": 1}, "last": 0},
                                                         {"name": "b", "n": {"x": 2}, "last": 1}]}
    assert render(text, values) == "Targets: **not met**. a 1 b 2!"


def test_template_refuses_a_placeholder_without_a_value():
    from benchmarks.report.template import render

    with pytest.raises(KeyError, match="seeds.table"):
        render("{{seeds.table}}", {"seeds": {}})


def test_store_finds_a_run_in_whichever_experiment_holds_it(tmp_path):
    from benchmarks.store import locate, read_all, read_runs, write_result

    write_result(tmp_path / "paper-table", "mnist-lenet5-sbp", {"benchmark": "paper-table"})
    write_result(tmp_path / "sbp-variants", "mnist-lenet5-sbp-kl5", {"benchmark": "paper-table", "tag": "kl5"})
    assert locate("mnist-lenet5-sbp-kl5", tmp_path) == tmp_path / "sbp-variants" / "mnist-lenet5-sbp-kl5.json"
    assert locate("cifar-vgg-sbp", tmp_path) is None
    assert [run for run, _ in read_all(tmp_path)] == ["mnist-lenet5-sbp", "mnist-lenet5-sbp-kl5"]
    assert read_runs(tmp_path / "sbp-variants") == [("mnist-lenet5-sbp-kl5", {"benchmark": "paper-table", "tag": "kl5"})]


@pytest.mark.data
def test_deploy_table_deploys_a_committed_lenet_to_int8_and_the_report_renders_its_goals(tmp_path, shared):
    from benchmarks.report.sections import deploy

    shared("mnist", "t10k-images-idx3-ubyte.gz")
    done = script("deploy_table", "--nets", "lenet5", "--quick", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "deploy-table-quick.json").read_text())
    net = result["nets"]["lenet5"]
    assert set(net["sizes"]) == {"dense fp32", "dense int8", "pruned fp32", "pruned int8"}
    sizes = net["sizes"]
    assert sizes["pruned int8"] < sizes["dense int8"] < sizes["dense fp32"] and sizes["pruned fp32"] < sizes["dense fp32"]
    # int8 leaves layers measured slower in int8 in float32 (on a loaded machine it may be all of them): then the
    # file is the float one plus a few quantize nodes, never materially larger
    assert sizes["pruned int8"] < 1.01 * sizes["pruned fp32"]
    assert abs(net["errors"]["ort"]["pruned int8"] - net["errors"]["ort"]["pruned fp32"]) < 0.01
    section = deploy("deploy-table-quick", result)
    assert "LeNet5-Caffe / mnist | pruned int8" in section["table"] and "error" in section["checks"]


def test_gather_forms_times_every_exact_form_of_the_pruned_lenet500s_pixel_read(tmp_path):
    done = script("gather_forms", "--quick", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gather-forms-quick.json").read_text())
    for batch in ("1", "64"):
        forms = result["batches"][batch]
        assert {"pruned (Gather)", "gather-rows", "every input read", "bounding box"} <= set(forms)
        assert forms["gather-rows"]["max_abs_diff"] == 0.0
        assert all(f["max_abs_diff"] < 1e-4 for k, f in forms.items() if k != "dense")
