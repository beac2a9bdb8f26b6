"""Bad merge input of every kind: a clear error naming the adapter, file, key or option,
and no output folder left behind."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from cotune.orchestrator.merge.base import MergeError
from cotune.orchestrator.merge.merger import merge_adapters
from safetensors.torch import load_file, save_file

from tests.unit.merge.conftest import MODULES, lora_key, random_adapter, write_adapter

Q = "model.layers.0.self_attn.q_proj"


def _fails(adapters: list[Path], out: Path, match: str, **options: object) -> MergeError:
    with pytest.raises(MergeError, match=match) as caught:
        merge_adapters(adapters, out, **options)  # type: ignore[arg-type]
    assert not out.exists(), "a failed merge must not leave an output folder"
    assert not list(out.parent.glob(f".{out.name}.*")), "nor a staging folder"
    return caught.value


def _edit_tensor(folder: Path, key: str, value: torch.Tensor) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[key] = value
    save_file(tensors, str(path))


def test_missing_folder(tmp_path: Path, two_adapters: list[Path]) -> None:
    error = _fails([two_adapters[0], tmp_path / "nope"], tmp_path / "out", "no such folder")
    assert str(tmp_path / "nope") in str(error)


def test_missing_config(tmp_path: Path, two_adapters: list[Path]) -> None:
    (two_adapters[1] / "adapter_config.json").unlink()
    error = _fails(two_adapters, tmp_path / "out", "missing adapter_config.json")
    assert str(two_adapters[1]) in str(error)


def test_missing_weights(tmp_path: Path, two_adapters: list[Path]) -> None:
    (two_adapters[1] / "adapter_model.safetensors").unlink()
    _fails(two_adapters, tmp_path / "out", rf"adapter {two_adapters[1]}: missing adapter_model")


class _Trap:
    """Unpickling this object would create a marker file: proof the merge never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_pickle_weights_are_refused_and_never_unpickled(
    tmp_path: Path, two_adapters: list[Path]
) -> None:
    marker = tmp_path / "unpickled"
    (two_adapters[1] / "adapter_model.safetensors").unlink()
    (two_adapters[1] / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    _fails(two_adapters, tmp_path / "out", r"adapter_model.bin is a pickle-based checkpoint")
    # A pickle renamed to .safetensors is not read as one either.
    (two_adapters[1] / "adapter_model.bin").rename(two_adapters[1] / "adapter_model.safetensors")
    _fails(two_adapters, tmp_path / "out", r"adapter_model.safetensors is not valid safetensors")
    assert not marker.exists()


def test_truncated_safetensors(tmp_path: Path, two_adapters: list[Path]) -> None:
    path = two_adapters[0] / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    _fails(two_adapters, tmp_path / "out", rf"adapter {two_adapters[0]}: .*not valid safetensors")


def test_config_not_json(tmp_path: Path, two_adapters: list[Path]) -> None:
    (two_adapters[0] / "adapter_config.json").write_text("{r: 4")
    _fails(two_adapters, tmp_path / "out", r"adapter_config.json: not valid JSON")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", -1, r"adapter_config.json: r: Input should be greater than 0"),
        ("lora_alpha", "big", r"adapter_config.json: lora_alpha: "),
        ("use_dora", True, r"use_dora: .*DoRA adapters"),
        ("peft_type", "IA3", r"peft_type: .*only LoRA adapters"),
    ],
)
def test_config_field_errors_name_the_field(
    tmp_path: Path, two_adapters: list[Path], field: str, value: object, message: str
) -> None:
    path = two_adapters[1] / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    error = _fails(two_adapters, tmp_path / "out", message)
    assert str(two_adapters[1]) in str(error)


def test_mismatched_base_models(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1, base="org/model-7b")
    b = random_adapter(tmp_path / "b", 2, base="org/model-13b")
    _fails(
        [a, b],
        tmp_path / "out",
        rf"adapter {b}: adapter_config.json base_model_name_or_path is 'org/model-13b' but "
        rf"adapter {a} has 'org/model-7b'",
    )


def test_mismatched_target_modules(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1)
    fewer = {k: v for k, v in MODULES.items() if k != Q}
    b = random_adapter(tmp_path / "b", 2, modules=fewer)
    _fails([a, b], tmp_path / "out", rf"adapter {b}: lacks tensor '{lora_key(Q, 'A')}'")
    _fails([b, a], tmp_path / "out", rf"adapter {a}: has tensor '{lora_key(Q, 'A')}'")


def test_mismatched_shapes(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1)
    b = random_adapter(tmp_path / "b", 2, modules={**MODULES, Q: (24, 32)})
    _fails([a, b], tmp_path / "out", rf"adapter {b}: tensors '{lora_key(Q, 'B')}' @ .* 24 x 32")


def test_rank_disagreeing_with_the_config(tmp_path: Path, two_adapters: list[Path]) -> None:
    _edit_tensor(two_adapters[1], lora_key(Q, "A"), torch.zeros(5, 16))
    _edit_tensor(two_adapters[1], lora_key(Q, "B"), torch.zeros(24, 5))
    _fails(two_adapters, tmp_path / "out", rf"'{lora_key(Q, 'A')}' has rank 5 but .* r=4")


def test_factor_pair_disagreeing_on_rank(tmp_path: Path, two_adapters: list[Path]) -> None:
    _edit_tensor(two_adapters[1], lora_key(Q, "B"), torch.zeros(24, 3))
    _fails(two_adapters, tmp_path / "out", r"disagree on the rank")


def test_unpaired_factor(tmp_path: Path, two_adapters: list[Path]) -> None:
    path = two_adapters[1] / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors[lora_key(Q, "B")]
    save_file(tensors, str(path))
    _fails(two_adapters, tmp_path / "out", rf"'{lora_key(Q, 'A')}' has no matching lora_B")


def test_non_lora_tensor(tmp_path: Path, two_adapters: list[Path]) -> None:
    key = "base_model.model.lm_head.modules_to_save.weight"
    _edit_tensor(two_adapters[0], key, torch.zeros(4, 4))
    _fails(two_adapters, tmp_path / "out", rf"tensor '{key}' is not a LoRA factor")


def test_integer_tensor(tmp_path: Path, two_adapters: list[Path]) -> None:
    _edit_tensor(two_adapters[0], lora_key(Q, "A"), torch.zeros(4, 16, dtype=torch.int32))
    _fails(two_adapters, tmp_path / "out", rf"'{lora_key(Q, 'A')}' has dtype I32")


def test_conv_factors(tmp_path: Path) -> None:
    tensors = {lora_key(Q, "A"): torch.ones(4, 16, 3, 3), lora_key(Q, "B"): torch.ones(24, 4, 1, 1)}
    a = write_adapter(tmp_path / "a", tensors, r=4, alpha=8)
    _fails([a], tmp_path / "out", r"only 2-D factors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tmp_path: Path, bad: float) -> None:
    # The bad module is the last one merged: output already streamed must be cleaned up.
    a = random_adapter(tmp_path / "a", 1)
    b = random_adapter(tmp_path / "b", 2)
    key = lora_key(Q, "B")
    tensor = load_file(str(b / "adapter_model.safetensors"))[key]
    tensor[3, 1] = bad
    _edit_tensor(b, key, tensor)
    _fails([a, b], tmp_path / "deep" / "out", rf"adapter {b}: tensor '{key}' has 1 NaN/Inf value")
    assert not (tmp_path / "deep").exists()


def test_bad_metrics_file(tmp_path: Path, two_adapters: list[Path]) -> None:
    (two_adapters[0] / "metrics.json").write_text(json.dumps({"tokens": -5}))
    _fails(two_adapters, tmp_path / "out", rf"{two_adapters[0]}/metrics.json: tokens: must be")
    (two_adapters[0] / "metrics.json").write_text("not json")
    _fails(two_adapters, tmp_path / "out", r"metrics.json: not valid JSON")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("1,2,3", r"--weights: got 3 weight\(s\) for 2 adapter\(s\)"),
        ("1,x", r"--weights: item 2 \('x'\) is not a number"),
        ("1,-1", r"weight 2 is negative"),
        ("0,0", r"the weights sum to 0"),
        ("nan,1", r"weight 1 is nan"),
        ("1,inf", r"weight 2 is inf"),
    ],
)
def test_bad_weights(tmp_path: Path, two_adapters: list[Path], weights: str, message: str) -> None:
    _fails(two_adapters, tmp_path / "out", message, weights=weights)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "mean"}, r"--method: unknown method 'mean'"),
        ({"method": "cat", "rank": 4}, r"--rank: method cat keeps"),
        ({"method": "linear", "rank": 4}, r"--rank: method linear keeps"),
        ({"method": "svd", "rank": 0}, r"--rank: must be a positive integer"),
        ({"method": "svd", "density": 0.5}, r"--density: only ties and dare"),
        ({"method": "ties", "density": 1.5}, r"--density: must be in \(0, 1\]"),
        ({"method": "dare", "density": 0.0}, r"--density: must be in \(0, 1\]"),
    ],
)
def test_bad_options(
    tmp_path: Path, two_adapters: list[Path], options: dict[str, object], message: str
) -> None:
    _fails(two_adapters, tmp_path / "out", message, **options)


def test_linear_with_differing_ranks_names_the_module(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1, r=4)
    b = random_adapter(tmp_path / "b", 2, r=8)
    _fails(
        [a, b],
        tmp_path / "out",
        r"module model\..*: method linear needs .* same rank",
        method="linear",
    )


def test_no_adapters(tmp_path: Path) -> None:
    _fails([], tmp_path / "out", r"no adapters given")


def test_output_folder_checks(tmp_path: Path, two_adapters: list[Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match=r"--out: .* exists and is not empty"):
        merge_adapters(two_adapters, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(MergeError, match=r"--out: .* overlaps input adapter"):
        merge_adapters(two_adapters, two_adapters[0] / "merged")
    assert not (two_adapters[0] / "merged").exists()


def test_missing_tokens_fall_back_to_equal_weights_with_a_warning(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1, tokens=100)
    b = random_adapter(tmp_path / "b", 2, tokens=None)
    report = merge_adapters([a, b], tmp_path / "out")
    assert report.summary.weights == (0.5, 0.5)
    assert report.summary.weight_source == "equal"
    assert any(
        f"no trained token count (metrics.json with 'tokens') for {b}" in w for w in report.warnings
    )
