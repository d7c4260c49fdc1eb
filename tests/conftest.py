"""Shared test fixtures and helpers (real models, real ONNX Runtime sessions)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ONNXPRUNE_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with a clear reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set ONNXPRUNE_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture
def shared():
    return shared_file


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Latency measurements go to a temporary cache, never the user's."""
    old = os.environ.get("ONNXPRUNE_CACHE_DIR")
    os.environ["ONNXPRUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("latency-cache"))
    yield
    if old is None:
        os.environ.pop("ONNXPRUNE_CACHE_DIR", None)
    else:
        os.environ["ONNXPRUNE_CACHE_DIR"] = old


@contextlib.contextmanager
def single_torch_thread():
    """One intra-op torch thread while open: on a shared, busy CPU, threads wait on each other (tiny nets run
    several times slower with two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (:func:`single_torch_thread`)."""
    with single_torch_thread():
        yield


# The slowest cases, run only with `-m slow` (`make test-all`) so the default suite stays near ten minutes on
# two cores; each area keeps faster cases of the same behaviour in the default run.
SLOW_CASES = (
    "tests/test_fuzz_inputs.py::test_damaged_mnist8_from_the_model_zoo_is_refused_cleanly",
    "tests/test_user_architectures.py::test_pruned_model_matches_the_wrapped_model_and_is_smaller[timm-coatnet_nano_rw-",
    "tests/test_user_architectures.py::test_pruned_model_matches_the_wrapped_model_and_is_smaller[timm-convnext_atto-",
    "tests/test_user_architectures.py::test_pruned_model_matches_the_wrapped_model_and_is_smaller[torchvision-mobilenet_v3",
    "tests/test_user_architectures.py::test_pruned_model_matches_the_wrapped_model_and_is_smaller[torchvision-maxvit-",
    "tests/test_user_architectures.py::test_pruned_model_matches_the_wrapped_model_and_is_smaller[torchvision-swin-",
    "tests/test_user_architectures.py::test_pruned_model_matches_the_wrapped_model_and_is_smaller[transformers-gpt2-",
    "tests/test_benchmarks_smoke.py::test_paper_table_trains_rbp_and_turbo_vbi_into_a_pruned_model_that_agrees",
    "tests/test_benchmarks_smoke.py::test_methods_zoo_trains_exports_and_reports_agreement",
    "tests/test_benchmarks_smoke.py::test_paper_table_runs_a_tagged_variant_end_to_end",
    "tests/test_benchmarks_smoke.py::test_deploy_table_deploys_a_committed_lenet_to_int8_and_the_report_renders",
    "tests/test_training.py::test_train_command_with_mac_weighted_kl_and_fine_tuning_prunes_the_fine_tuned_net",
    "tests/test_training.py::test_train_command_with_the_authors_gate_placement_and_noise_prunes_and_deploys_int8",
    "tests/test_training.py::test_train_command_runs_under_torchrun_and_rank_0_alone_writes",
    "tests/test_exporters.py::test_pruned_export_is_exact[torchvision-mobilenet_v3_small-dynamo]",
    "tests/test_head_gates_functional.py::test_multihead_attention_in_a_users_model_gets_a_gate_per_head[rbp-",
    "tests/test_head_gates_functional.py::test_multihead_attention_in_a_users_model_gets_a_gate_per_head[turbo-vbi-seq",
)


def pytest_collection_modifyitems(config, items):
    """Mark the cases listed in SLOW_CASES (node-id prefixes) as slow."""
    for item in items:
        if item.nodeid.startswith(SLOW_CASES):
            item.add_marker(pytest.mark.slow)
