"""The sweep spec: parsing, search dimensions, trial specs, cross-field checks, data probing."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cotune.orchestrator.protocol.search_space import Choice, IntRange, LogUniform, Uniform
from cotune.orchestrator.protocol.spec import (
    SpecError,
    SweepSpec,
    implied,
    inspect_spec,
    load_spec,
    parse_spec,
    parse_spec_yaml,
    spec_warnings,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/*/sweep.yaml"))


def base(**sections: Any) -> dict[str, Any]:
    """A minimal valid spec (no files: parse_spec does not read them), with overrides."""
    data: dict[str, Any] = {
        "name": "t",
        "base_model": "cotune://tiny-llama",
        "dataset": {"path": "s3://bucket/train.jsonl"},
        "training": {"max_steps": 10},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def paths(exc: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return [e.path for e in exc.value.errors]


# ----- the shipped examples -----------------------------------------------------------------


def test_examples_are_shipped() -> None:
    names = {p.parent.name for p in EXAMPLES}
    assert {"tiny", "gpu-1b"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_every_example_is_valid_without_warnings(path: Path) -> None:
    report = inspect_spec(path)
    assert report.warnings == []
    assert report.dataset_rows is not None and report.dataset_rows >= 100
    assert not report.spec.is_concrete()
    assert Path(report.spec.dataset.path).is_file()


def test_tiny_example_implies_16_shard_tasks() -> None:
    spec = load_spec(ROOT / "examples/tiny/sweep.yaml")
    assert spec.base_model_kind == "builtin"
    assert spec.search_space() == {
        "training.learning_rate": LogUniform(1e-3, 1e-2),
        "lora.lora_r": Choice((4, 8)),
    }
    assert spec.search.pruner.type in ("median", "successive_halving")
    what = implied(spec, dataset_rows=1000)
    assert (what.n_trials, what.rounds, what.shards) == (4, 2, 2)
    assert what.shard_tasks == 16
    assert what.merge_steps == 8
    t = spec.training
    assert isinstance(t.max_steps, int) and isinstance(t.micro_batch_size, int)
    assert isinstance(t.gradient_accumulation_steps, int)
    per_task = t.max_steps * t.micro_batch_size * t.gradient_accumulation_steps * t.sequence_len
    assert what.estimated_tokens == 16 * per_task


def test_gpu_example_is_a_pinned_4bit_llama() -> None:
    spec = load_spec(ROOT / "examples/gpu-1b/sweep.yaml")
    assert spec.base_model_kind == "hf"
    assert spec.base_model_revision is not None and len(spec.base_model_revision) == 40
    assert spec.quantization.type == "nf4" and spec.quantization.compute_dtype == "bf16"


# ----- values and search dimensions ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "dim"),
    [
        ([1e-4, 3e-4], Choice((1e-4, 3e-4))),
        ({"choice": [1e-4]}, Choice((1e-4,))),
        ({"loguniform": [1e-5, 1e-3]}, LogUniform(1e-5, 1e-3)),
        ({"uniform": [1e-4, 2e-4]}, Uniform(1e-4, 2e-4)),
    ],
)
def test_real_field_dimensions(raw: Any, dim: Any) -> None:
    spec = parse_spec(base(training={"learning_rate": raw}, search={"n_trials": 2}))
    assert spec.search_space() == {"training.learning_rate": dim}


@pytest.mark.parametrize(
    ("raw", "dim"),
    [
        ({"int": [4, 64], "log": True}, IntRange(4, 64, log=True)),
        ({"int": [4, 16], "step": 4}, IntRange(4, 16, step=4)),
        ([8, 16], Choice((8, 16))),
    ],
)
def test_whole_number_dimensions(raw: Any, dim: Any) -> None:
    spec = parse_spec(base(lora={"lora_r": raw}, search={"n_trials": 2}))
    assert spec.search_space() == {"lora.lora_r": dim}


def test_yaml_12_exponent_floats_are_numbers() -> None:
    # YAML 1.1 (PyYAML's default) reads 1e-4 as a string; specs read it as everyone means.
    text = (
        "name: t\nbase_model: cotune://tiny-llama\ndataset: {path: s3://bucket/x.jsonl}\n"
        "training: {max_steps: 10, learning_rate: 1e-4, weight_decay: {uniform: [0, 1E-2]}}\n"
        "search: {n_trials: 2}\n"
    )
    spec = parse_spec_yaml(text)
    assert spec.training.learning_rate == 1e-4
    assert spec.search_space()["training.weight_decay"] == Uniform(0.0, 1e-2)


def test_target_modules_plain_list_is_a_value_and_choice_searches_it() -> None:
    plain = parse_spec(base(lora={"lora_target_modules": ["q_proj", "v_proj"]}))
    assert plain.lora.lora_target_modules == ["q_proj", "v_proj"]
    assert plain.is_concrete()
    searched = parse_spec(
        base(
            lora={"lora_target_modules": {"choice": [["q_proj", "v_proj"], "all-linear"]}},
            search={"n_trials": 2},
        )
    )
    dim = searched.search_space()["lora.lora_target_modules"]
    assert dim == Choice((("q_proj", "v_proj"), "all-linear"))
    assert dim.default() == ["q_proj", "v_proj"]
    trial = searched.with_params({"lora.lora_target_modules": "all-linear"})
    assert trial.lora.lora_target_modules == "all-linear"


@pytest.mark.parametrize(
    ("dim", "default"),
    [
        (Choice((8, 4)), 8),
        (Uniform(0.0, 0.1), 0.05),
        (LogUniform(1e-4, 1e-2), 1e-3),
        (IntRange(4, 64, log=True), 16),
        (IntRange(1, 10), 6),  # 5.5 rounds half up
        (IntRange(4, 16, step=4), 12),  # 10 is halfway between 8 and 12: half up
    ],
)
def test_dimension_defaults(dim: Any, default: Any) -> None:
    assert dim.default() == pytest.approx(default)
    assert dim.contains(dim.default())


def test_with_params_is_concrete_and_fills_defaults() -> None:
    spec = parse_spec(
        base(
            training={"learning_rate": {"loguniform": [1e-4, 1e-2]}, "micro_batch_size": [2, 4]},
            lora={"lora_r": {"int": [4, 16], "step": 4}, "lora_dropout": {"uniform": [0.0, 0.2]}},
            search={"n_trials": 8},
        )
    )
    assert not spec.is_concrete()
    trial = spec.with_params({"training.learning_rate": 3e-3, "lora.lora_r": 12})
    assert trial.is_concrete() and trial.search_space() == {}
    assert trial.training.learning_rate == 3e-3
    assert trial.lora.lora_r == 12
    assert trial.training.micro_batch_size == 2  # first choice
    assert trial.lora.lora_dropout == pytest.approx(0.1)  # middle of the range
    assert trial.params()["lora.lora_r"] == 12
    # The original is untouched: specs are immutable.
    assert isinstance(spec.lora.lora_r, IntRange)
    assert (trial.search.n_trials, trial.search.max_concurrent_trials) == (1, None)
    assert parse_spec_yaml(trial.to_yaml()) == trial


def test_with_params_refuses_unknown_out_of_range_and_mistyped_values() -> None:
    spec = parse_spec(
        base(
            lora={"lora_r": [4, 8]},
            training={"learning_rate": {"loguniform": [1e-4, 1e-2]}},
            search={"n_trials": 2},
        )
    )
    with pytest.raises(SpecError) as exc:
        spec.with_params({"lora.lora_r": 16, "training.learning_rate": "high", "lora.nope": 1})
    assert sorted(paths(exc)) == ["lora.lora_r", "lora.nope", "training.learning_rate"]
    assert "outside" in str(exc.value)


def test_grid_size_and_trials() -> None:
    spec = parse_spec(
        base(
            lora={"lora_r": [4, 8, 16]},
            training={"gradient_accumulation_steps": {"int": [1, 2]}},
            search={"method": "grid"},
        )
    )
    assert spec.grid_size() == 6
    assert implied(spec).n_trials == 6
    capped = parse_spec(base(lora={"lora_r": [4, 8, 16]}, search={"method": "grid", "n_trials": 2}))
    assert implied(capped).n_trials == 2
    assert parse_spec(base(lora={"lora_r": [4, 8]}, search={"n_trials": 3})).grid_size() is None


def test_to_yaml_round_trips() -> None:
    spec = load_spec(ROOT / "examples/gpu-1b/sweep.yaml")
    assert parse_spec_yaml(spec.to_yaml()) == spec


def test_json_schema_builds_for_api_bodies() -> None:
    schema = SweepSpec.model_json_schema()
    assert "learning_rate" in json.dumps(schema)


# ----- errors: all of them, each named -------------------------------------------------------


def test_every_structural_error_is_reported_at_once() -> None:
    data = base(training={"learning_rate": -1, "micro_batch_size": 0}, rounds=0)
    data["dataset"]["shards"] = "two"
    data["lora"] = {"lora_rank": 8}
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    assert sorted(paths(exc)) == [
        "dataset.shards",
        "lora.lora_rank",
        "rounds",
        "training.learning_rate",
        "training.micro_batch_size",
    ]
    assert "did you mean 'lora_r'" in str(exc.value)


def test_every_cross_field_error_is_reported_at_once() -> None:
    data = base(
        training={"num_epochs": 1, "warmup_steps": 2, "warmup_ratio": 0.1},
        merge={"method": "linear", "rank": 4, "density": 0.5},
        search={"direction": "maximize", "n_trials": 3},
    )
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    assert sorted(paths(exc)) == [
        "merge.density",
        "merge.rank",
        "search.direction",
        "search.n_trials",
        "training.max_steps",
        "training.warmup_steps",
    ]
    messages = str(exc.value)
    assert "Can't set both training.max_steps and training.num_epochs" in messages
    assert "training.warmup_ratio" in messages


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (
            {"search": {"method": "grid"}, "lora": {"lora_r": {"int": [4, 64], "log": True}}},
            "lora.lora_r",
        ),
        (
            {"search": {"method": "grid"}, "lora": {"lora_dropout": {"uniform": [0.0, 0.1]}}},
            "lora.lora_dropout",
        ),
        (
            {"search": {"pruner": {"type": "median", "min_resource": 1}}},
            "search.pruner.min_resource",
        ),
        ({"search": {"pruner": {}}}, "search.pruner.type"),
        (
            {"search": {"pruner": {"type": "hyperband", "min_resource": 3}}, "rounds": 2},
            "search.pruner.min_resource",
        ),
        ({"base_model": "org/name", "base_model_revision": "has space"}, "base_model_revision"),
        ({"base_model": "a..b"}, "base_model"),
        (
            {"lora": {"lora_r": {"int": [4, 15], "step": 4}}, "search": {"n_trials": 2}},
            "lora.lora_r",
        ),
        (
            {"training": {"learning_rate": {"loguniform": [1e-4]}}, "search": {"n_trials": 2}},
            "training.learning_rate",
        ),
        (
            {"training": {"learning_rate": {"int": [1, 2]}}, "search": {"n_trials": 2}},
            "training.learning_rate",
        ),
        ({"training": {"learning_rate": float("nan")}}, "training.learning_rate"),
        ({"dataset": {"eval_split": True}}, "dataset.eval_split"),
        ({"dataset": {"path": "gs://bucket/x.jsonl"}}, "dataset.path"),
    ],
)
def test_errors_name_the_field(overrides: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(base(**overrides))
    assert path in paths(exc), exc.value


def test_base_model_kinds() -> None:
    assert parse_spec(base(base_model="meta-llama/Llama-3.2-1B")).base_model_kind == "hf"
    assert parse_spec(base(base_model="gpt2")).base_model_kind == "hf"
    assert parse_spec(base(base_model="s3://models/llama/1b")).base_model_kind == "s3"
    assert parse_spec(base(base_model="/models/llama")).base_model_kind == "local"


# ----- warnings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"base_model": "org/name"}, "base_model_revision"),
        ({"base_model": "org/name", "base_model_revision": "main"}, "base_model_revision"),
        ({"lora": {"lora_r": [4, 8]}, "search": {"method": "tpe", "n_trials": 4}}, "search.method"),
        ({"search": {"pruner": {"type": "successive_halving"}}}, "search.pruner"),
        (
            {"rounds": 3, "search": {"pruner": {"type": "median", "n_warmup_steps": 3}}},
            "search.pruner",
        ),
        ({"quantization": {"type": "int8", "double_quant": True}}, "quantization.double_quant"),
        ({"merge": {"method": "svd", "rank": 64}}, "merge"),
        ({"dataset": {"shards": 2}, "merge": {"rank": 64}}, "merge.rank"),
        ({"training": {"warmup_steps": 10}}, "training.warmup_steps"),
        ({"search": {"method": "grid"}}, "search.method"),
        (
            {"rounds": 3, "search": {"pruner": {"type": "median"}}},  # 5 startup trials of 1
            "search.pruner.n_startup_trials",
        ),
    ],
)
def test_warnings_name_the_field(overrides: dict[str, Any], path: str) -> None:
    spec = parse_spec(base(**overrides))
    assert path in [w.path for w in spec_warnings(spec)]


def test_a_plain_spec_has_no_warnings() -> None:
    spec = parse_spec(base(rounds=3, search={"pruner": {"type": "successive_halving"}}))
    assert spec_warnings(spec) == []


# ----- spec files and the data they name -----------------------------------------------------


def write_spec(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def alpaca_rows(n: int) -> list[dict[str, str]]:
    return [{"instruction": "Reverse.", "input": f"w{i}", "output": f"{i}w"} for i in range(n)]


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in alpaca_rows(20))
    )
    (tmp_path / "data/eval.jsonl").write_text(json.dumps(alpaca_rows(1)[0]) + "\n")
    spec_path = write_spec(
        tmp_path, base(dataset={"path": "data/train.jsonl", "eval_split": "data/eval.jsonl"})
    )
    report = inspect_spec(spec_path)
    assert report.spec.dataset.path == str(tmp_path / "data/train.jsonl")
    assert report.spec.dataset.eval_split == str(tmp_path / "data/eval.jsonl")
    assert report.dataset_rows == 20


def test_folder_rows_sum_over_jsonl_json_gz_and_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow (dev extra) writes the parquet part")
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(3)) + "\n")
    (data / "b.json").write_text(json.dumps(alpaca_rows(4)))
    with gzip.open(data / "more/c.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in alpaca_rows(5)))
    pq.write_table(pa.Table.from_pylist(alpaca_rows(6)), data / "more/d.parquet")
    (data / "README.md").write_text("not data")
    (data / ".hidden.jsonl").write_text("not even json\n")
    report = inspect_spec(write_spec(tmp_path, base(dataset={"path": "data"})))
    assert report.dataset_rows == 3 + 4 + 5 + 6


def test_parquet_rows_are_checked_against_the_format(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow (dev extra) writes the parquet file")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "hello"}] * 5), tmp_path / "t.parquet")
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(tmp_path, base(dataset={"path": "t.parquet", "eval_split": 0.2})))
    assert paths(exc) == ["dataset.format"]
    spec = load_spec(
        write_spec(
            tmp_path, base(dataset={"path": "t.parquet", "format": "text", "eval_split": 0.2})
        )
    )
    assert spec.dataset.format == "text"


def test_bad_rows_within_max_bad_rows_are_tolerated(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in alpaca_rows(99)] + ["{not json"]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    ok = base(dataset={"path": "train.jsonl", "max_bad_rows": 0.02})
    assert inspect_spec(write_spec(tmp_path, ok)).dataset_rows == 100
    strict = base(dataset={"path": "train.jsonl", "max_bad_rows": 0.0})
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(tmp_path, strict))
    assert paths(exc) == ["dataset.path"]  # broken JSON is the file's fault, not the format's
    assert "row 100: not valid JSON" in str(exc.value)


def test_s3_data_is_noted_not_counted(tmp_path: Path) -> None:
    report = inspect_spec(write_spec(tmp_path, base()))
    assert report.dataset_rows is None
    assert [n.path for n in report.notes] == ["dataset.path"]


def test_local_base_model_needs_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    data = base(base_model="./model", dataset={"path": "s3://bucket/x.jsonl"})
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(tmp_path, data))
    assert paths(exc) == ["base_model"] and "config.json" in str(exc.value)
    (tmp_path / "model/config.json").write_text("{}")
    assert load_spec(write_spec(tmp_path, data)).base_model == str(tmp_path / "model")


def test_epoch_based_token_estimate_uses_the_row_count() -> None:
    spec = parse_spec(
        base(
            training={"max_steps": None, "num_epochs": 2, "sequence_len": 64}, dataset={"shards": 2}
        )
    )
    assert implied(spec).estimated_tokens is None
    # 100 rows, 10 held out, 45 per shard, 2 epochs, 64 tokens each, 2 shard tasks.
    assert implied(spec, dataset_rows=100).estimated_tokens == 2 * 90 * 64


def test_docs_reference_is_current() -> None:
    from cotune.orchestrator.cli.specdocs import render

    doc = ROOT / "docs/spec.md"
    assert doc.read_text() == render(), (
        "regenerate: python -m cotune.orchestrator.cli.specdocs > docs/spec.md"
    )


def test_spec_modules_stay_light() -> None:
    # The worker and the submitter's base install import these: pydantic and PyYAML only.
    import ast

    allowed = {"pydantic", "pydantic_core", "yaml", "cotune", "__future__"}
    lazily = {"pyarrow", "zstandard"}  # imported inside functions, skipped when missing
    protocol = ROOT / "orchestrator/protocol"
    for module in [*protocol.glob("spec/*.py"), *protocol.glob("*.py")]:
        if module.parent.name != "spec" and module.stem not in ("search_space", "dataset_probe"):
            continue
        tree = ast.parse(module.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, (module.name, name)
                assert top not in lazily


def test_parquet_without_pyarrow_is_a_note_not_an_error(tmp_path: Path) -> None:
    # The submitter's base install has no pyarrow: the row count is skipped with a note.
    # sys.modules[name] = None is how Python itself spells "this module cannot be imported".
    pa = pytest.importorskip("pyarrow", reason="pyarrow (dev extra) writes the parquet file")
    import subprocess

    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(alpaca_rows(5)), tmp_path / "t.parquet")
    spec = write_spec(tmp_path, base(dataset={"path": "t.parquet"}))
    probe = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "from pathlib import Path\n"
        "from cotune.orchestrator.protocol.spec import inspect_spec\n"
        f"r = inspect_spec(Path({str(spec)!r}))\n"
        "print(r.dataset_rows, [str(n) for n in r.notes])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("None ") and "pyarrow not installed" in out.stdout
