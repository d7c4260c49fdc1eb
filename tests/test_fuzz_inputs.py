"""Damaged model files are refused cleanly by `onnxprune prune`: seeded mutation fuzzing.

Each mutation (byte flips, truncation, inserted bytes, a name made non-UTF-8)
goes through the command line in-process. Whatever the damage: exit code 0
or 2; on 2 one line on stderr, no output and nothing staged left in the
folder; the input's bytes never change.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from onnxprune.cli import main
from tests.conftest import shared_file
from tests.graphs import GraphBuilder

SEED = 20_240_607
Mutation = tuple[str, bytes]  # (what was done, the damaged file)


def flip_bytes(data: bytes, rng: random.Random) -> Mutation:
    damaged = bytearray(data)
    spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
    for spot in spots:
        damaged[spot] ^= rng.randint(1, 255)
    return f"flip bytes at {spots}", bytes(damaged)


def truncate(data: bytes, rng: random.Random) -> Mutation:
    end = rng.randrange(len(data))
    return f"truncate at {end}", data[:end]


def insert_bytes(data: bytes, rng: random.Random) -> Mutation:
    spot = rng.randrange(len(data) + 1)
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return f"insert {extra.hex()} at {spot}", data[:spot] + extra + data[spot:]


def model_names(data: bytes) -> list[str]:
    """Names of the model's nodes and tensors, as stored in the file."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    graph = model.graph
    names = [n.name for n in graph.node] + [t.name for t in graph.initializer]
    names += [v for n in graph.node for v in n.output] + [v.name for v in graph.input]
    return sorted({n for n in names if len(n) >= 2})


def break_utf8_name(names: list[str]) -> Callable[[bytes, random.Random], Mutation]:
    """A mutation that makes one stored name invalid UTF-8 (same length: the protobuf still parses)."""

    def mutate(data: bytes, rng: random.Random) -> Mutation:
        name = rng.choice(names).encode()
        starts = [i for i in range(len(data)) if data.startswith(name, i)]
        spot = rng.choice(starts) + rng.randrange(len(name))
        bad = rng.choice([0xFF, 0xFE, 0xC3, 0x80, 0xED])
        return f"name {name.decode()!r}: byte {bad:#x} at {spot}", data[:spot] + bytes([bad]) + data[spot + 1 :]

    return mutate


def mutations(data: bytes, count: int, seed: int) -> Iterator[tuple[bool, Mutation]]:
    """``count`` seeded mutations of ``data``; the flag says whether the damage must be refused (exit 2)."""
    rng = random.Random(seed)
    blind = (flip_bytes, truncate, insert_bytes)
    names = break_utf8_name(model_names(data))
    for i in range(count):
        if i % 4 == 3:
            yield True, names(data, rng)
        else:
            yield False, blind[i % 4](data, rng)


def prune_damaged(folder: Path, damaged: bytes, capfd) -> tuple[int, str, str]:
    """Write ``damaged`` as folder/in.onnx, prune it quietly to folder/out.onnx; (exit code, stdout, stderr).

    ``capfd`` sees what native code (onnxruntime's own log) writes to the terminal too.
    """
    (folder / "in.onnx").write_bytes(damaged)
    code = main(["prune", str(folder / "in.onnx"), "-o", str(folder / "out.onnx"), "--target", "none", "-q"])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def problems_after(folder: Path, damaged: bytes, run: tuple[int, str, str], must_refuse: bool, inputs: set[str]) -> list[str]:
    """What went wrong with one mutation's run (empty when it was handled cleanly)."""
    code, out, err = run
    problems = []
    if code not in (0, 2) or (must_refuse and code != 2):
        problems.append(f"exit {code}: {err.strip()[:300]}")
    if (folder / "in.onnx").read_bytes() != damaged:
        problems.append("the input file changed")
    if code == 2:
        left = {p.name for p in folder.iterdir()} - inputs
        if left:
            problems.append(f"left behind: {sorted(left)}")
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("onnxprune: error: ") or out:
            problems.append(f"not one error line on stderr and nothing else: {out!r} {err!r}")
    return problems


def fuzz(folder: Path, data: bytes, count: int, capfd, *, seed: int = SEED) -> None:
    """Run ``count`` mutations of ``data`` (the model in folder/in.onnx) and assert each was handled cleanly."""
    inputs = {p.name for p in folder.iterdir()} | {"in.onnx"}
    failures = []
    for must_refuse, (what, damaged) in mutations(data, count, seed):
        problems = problems_after(folder, damaged, prune_damaged(folder, damaged, capfd), must_refuse, inputs)
        failures += [f"{what}: {p}" for p in problems]
        for written in folder.glob("out.onnx*"):
            written.unlink()
    assert not failures, f"{len(failures)} mutation(s) mishandled:\n" + "\n".join(failures[:20])


def small_cnn(width: int = 8) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> Relu -> pool -> Gemm, with dead channels to prune."""
    g = GraphBuilder(seed=3)
    x = g.input("x", ["n", 3, 8, 8])
    h = g.relu(g.batchnorm(g.conv(x, 3, width, dead=[1, 4]), width))
    h = g.relu(g.conv(h, width, 6, k=1, dead=[2]))
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    g.output(g.gemm(pooled, 6, 4))
    return g.build()


def test_damaged_mnist8_from_the_model_zoo_is_refused_cleanly(tmp_path, capfd):
    data = shared_file("pretrained", "onnx-zoo-mnist", "mnist-8.onnx").read_bytes()
    fuzz(tmp_path, data, 160, capfd)


def test_damaged_small_cnn_is_refused_cleanly(tmp_path, capfd):
    fuzz(tmp_path, small_cnn().SerializeToString(), 120, capfd, seed=SEED + 1)


def test_damaged_model_with_external_data_is_refused_cleanly(tmp_path, capfd):
    onnx.save_model(small_cnn(), tmp_path / "in.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="in.weights", size_threshold=0)
    fuzz(tmp_path, (tmp_path / "in.onnx").read_bytes(), 80, capfd, seed=SEED + 2)


@pytest.mark.parametrize("bad", [0xFF, 0xC3, 0x80])
def test_a_name_that_is_not_utf8_is_an_input_error(tmp_path, capfd, bad):
    data = small_cnn().SerializeToString()
    spot = data.index(b"globalaveragepool") + 2
    code, _, err = prune_damaged(tmp_path, data[:spot] + bytes([bad]) + data[spot + 1 :], capfd)
    assert code == 2 and "not UTF-8" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def drop_first_conv_input(model: onnx.ModelProto) -> None:
    """The first Conv reads its weight as data and its bias as weight (the checker lets it pass)."""
    del model.graph.node[0].input[0]


def shorten_first_weight(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-8]


def unknown_data_type(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].data_type = 91


def string_attribute_not_utf8(model: onnx.ModelProto) -> None:
    model.graph.node[0].attribute.add(name="auto_pad", s=b"NOT\xffSET", type=onnx.AttributeProto.STRING)


@pytest.mark.parametrize(
    "damage, message",
    [
        (drop_first_conv_input, "onnxruntime cannot run it"),
        (shorten_first_weight, "fails the ONNX checker"),
        (unknown_data_type, "fails the ONNX checker"),
        (string_attribute_not_utf8, "attribute 'auto_pad' holds text that is not UTF-8"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_model_damaged_past_the_reading_checks_is_an_input_error(tmp_path, capfd, damage, message):
    model = small_cnn()
    damage(model)
    code, out, err = prune_damaged(tmp_path, model.SerializeToString(), capfd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def damaged_external_data(tmp_path: Path, key: str, value: str) -> bytes:
    """small_cnn's file with external data, its first tensor's ``key`` entry renamed to or set to ``value``."""
    onnx.save_model(small_cnn(width=32), tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="in.weights", size_threshold=0)
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    (tmp_path / "m.onnx").unlink()
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == key)
    if value.isidentifier():
        entry.key = value
    else:
        entry.value = value
    return model.SerializeToString()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("length", "lenght", "unknown external data key(s) ['lenght']"),
        ("offset", "4?64", "external data offset '4?64', not a number"),
        ("length", "-3", "negative external data length"),
    ],
)
def test_a_damaged_external_data_reference_is_an_input_error(tmp_path, capfd, key, value, message):
    code, out, err = prune_damaged(tmp_path, damaged_external_data(tmp_path, key, value), capfd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.weights"]
