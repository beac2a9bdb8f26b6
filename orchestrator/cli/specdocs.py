"""docs/spec.md, generated from the sweep spec's models so the reference cannot drift.

    python -m cotune.orchestrator.cli.specdocs > docs/spec.md

tests/unit/test_spec.py fails when docs/spec.md differs from what this prints.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from cotune.orchestrator.protocol import spec as spec_module
from cotune.orchestrator.protocol.search_space import NumberCheck, Searchable
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

INTRO = """\
# The sweep spec

A sweep spec is one YAML file: a base model, a dataset, how each shard task trains, the LoRA
adapter, quantization, federated rounds, the hyperparameter search, merging and trust.
`cotune validate SPEC` checks one and shows what it implies, without running anything; it
exits 2 and lists every error as `field.path: reason` when the spec is not usable.
[examples/tiny/sweep.yaml](../examples/tiny/sweep.yaml) runs on a CPU in minutes;
[examples/gpu-1b/sweep.yaml](../examples/gpu-1b/sweep.yaml) is a realistic GPU sweep.

This page is generated from the models in `orchestrator/protocol/spec/sections.py` and
`orchestrator/protocol/spec/model.py`: `python -m cotune.orchestrator.cli.specdocs > docs/spec.md`.

## Reading rules

- Unknown keys are errors everywhere (with a "did you mean" hint); so are values of the wrong
  type: `"8"` or `true` where a number belongs. `1e-4` is a number (YAML 1.2), and a key given
  twice is an error.
- Relative local paths (`dataset.path`, an eval file, a local `base_model` folder) are relative
  to the spec file's folder.
- Checking runs in two stages: first every field on its own (all such errors are listed), then,
  once every field is valid, the checks between fields and against the files (all listed).

## Base models

`base_model` is a Hugging Face id (`org/name`, pinned by `base_model_revision`) that workers
download from the hub; `cotune://tiny-llama`, which each worker builds on first use; or, with
no hub and no shared disk, a folder on the coordinator (`/path`) or `s3://bucket/prefix/` in
the coordinator's bucket. A folder or prefix is staged when the job starts: the coordinator
packs its regular files into one archive and stores it once at `models/<sha256>/model.tar`
(the same files give the same sha256, so jobs on one model share it); workers get it as a
presigned download checked by that sha256, and they and the coordinator's evaluation cache
the unpacked folder by it. The folder needs its config.json; symbolic links are refused
(`huggingface-cli download --local-dir DIR` writes plain files), and `.git/` and `.cache/`
are left out. A folder that cannot be staged fails the job with an error naming base_model.

## Search dimensions

Searchable fields (marked *searchable* below) take a plain value, or:

| form | meaning | under `method: grid` |
|---|---|---|
| `[a, b, c]` | choice among the values | a grid axis |
| `{choice: [a, b, c]}` | the same, spelled out | a grid axis |
| `{uniform: [lo, hi]}` | a real number, uniform in [lo, hi] | error: not a grid axis |
| `{loguniform: [lo, hi]}` | a real number, uniform in log space; lo > 0 | error: not a grid axis |
| `{int: [lo, hi], step: 1}` | a whole number on a step grid | a grid axis |
| `{int: [lo, hi], log: true}` | a whole number, log-uniform; lo >= 1 | error: not an axis |

Real-valued fields take `uniform`, `loguniform` and choices; whole-number fields take `int`
and choices. For `lora.lora_target_modules` a plain list is the value (a list of module
names); search it with `{choice: [[q_proj, v_proj], all-linear]}`.

A dimension's default (what `SweepSpec.with_params` fills in for a dimension that a trial does
not set) is the first choice, the middle of a uniform range, the geometric middle of a log
range, and the middle of an int range rounded half up onto its step grid.

What an empty search space means: with no searchable field searched, a spec is one
configuration: one trial (pure federated training, or a single run). `n_trials` > 1 over
nothing is an error (it would train the same configuration again and again, with the same
seeds); `method: grid` over nothing is the one-point grid, with a warning. An empty choice
(`[]`, `{choice: []}`) is an error. A trial's spec (`SweepSpec.with_params`) is concrete and a
one-trial sweep (`n_trials: 1`), so it parses back as a valid spec.

`method: random` and `tpe` need `search.n_trials` when something is searched; `grid` runs the
whole grid, capped by `n_trials` when it is given.

## Checks between fields

Errors:

- `training.max_steps` and `training.num_epochs`: exactly one of them.
- `training.warmup_steps` and `training.warmup_ratio`: not both.
- `merge.density` only with `merge.method` ties or dare; `merge.rank` not with cat (exact at
  rank shards x r) or linear (keeps the inputs' rank).
- `base_model_revision` only for a Hugging Face id.
- `search.max_concurrent_trials` at most the trials; `search.n_trials` as above; under
  `method: grid` every dimension must be a grid axis.
- A pruner's parameters must be its own (`search.pruner.type` decides which);
  `search.pruner.max_resource` at most `rounds`, `min_resource` at most `max_resource`.
- `search.direction: maximize` with the loss metric.
- Local files must exist (`dataset.path`, an eval file, a local `base_model` with its
  config.json). Rows are counted in local .jsonl/.ndjson/.json/.parquet files (.gz/.zst too,
  summed over a folder; s3:// data is counted when the job is sharded): `dataset.shards` at
  most the training rows, a fractional `dataset.eval_split` holds out at least one row, and
  the first 1000 rows must fit `dataset.format` within `dataset.max_bad_rows`.
- With `--tokenizer FOLDER`: of the first `--rows` rows (10,000), rendered as training
  renders them, at most `dataset.max_dropped_rows` may lose every trained token to
  `training.sequence_len` and at most `dataset.max_cut_rows` be cut short. The coordinator
  counts the same on the eval split of every job (after its base evaluation) and fails the
  job past either; more than 2% cut or dropped is a warning in both places.

Warnings (the spec is still valid):

- `base_model_revision` unpinned for a Hugging Face id, or a branch or tag rather than a sha.
- `tpe` with no more trials than its 10 random startup trials; `grid` over nothing;
  `n_trials` above the grid's size; a median pruner whose `n_startup_trials` covers every
  trial.
- A pruner that cannot stop anything before the last round. Trials report after each round
  with step = rounds done, so `successive_halving` and `hyperband` need `min_resource` <
  `rounds`, and `median` needs `max(n_warmup_steps, 1)` < `rounds`.
- `double_quant` with int8 or none; `trust.redundancy` without volunteers; a `merge` section
  with one shard; `merge.rank` above shards x `lora_r`; `checkpoint_steps` or `warmup_steps`
  at or above `max_steps`.

## Axolotl names

Keys mean what they mean in axolotl where axolotl has them: `base_model`, `sequence_len`,
`micro_batch_size`, `gradient_accumulation_steps`, `learning_rate`, `lr_scheduler`,
`warmup_steps`, `warmup_ratio`, `weight_decay`, `optimizer`, `max_steps`, `num_epochs`,
`gradient_checkpointing`, `sample_packing`, `train_on_inputs`, `max_grad_norm`, `seed`,
`lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`. Differences:

| axolotl | cotune |
|---|---|
| `adapter: qlora` + `load_in_4bit: true` | `quantization.type: nf4` (or `fp4`) |
| `bnb_4bit_use_double_quant` | `quantization.double_quant` |
| `adapter: lora` + `load_in_8bit: true` | `quantization.type: int8` |
| `adapter: lora`, no quantization | `quantization.type: none` |
| `bf16: auto` / `fp16` / `tf32` | `quantization.compute_dtype: auto \\| bf16 \\| fp16 \\| fp32` |
| `lora_target_linear: true` | `lora_target_modules: all-linear` |
| `revision_of_model` | `base_model_revision` |
| `save_steps` | `training.checkpoint_steps` |
| `datasets: [{path, type}]` | `dataset: {path, format}` (one dataset) |
| `val_set_size` | `dataset.eval_split` |
"""


def render() -> str:
    parts = [INTRO, "## Fields\n"]
    root = spec_module.SweepSpec
    parts.append(_table(root, "", skip_models=True))
    for name, info in root.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            parts.append(f"### `{name}`\n\n{_doc(model)}\n")
            if name == "search":
                parts.append(_table(model, f"{name}.", skip_models=False))
                for pruner in _union_models(model.model_fields["pruner"].annotation):
                    tag = typing.get_args(pruner.model_fields["type"].annotation)[0]
                    parts.append(f"#### `search.pruner` with `type: {tag}`\n\n{_doc(pruner)}\n")
                    parts.append(_table(pruner, "search.pruner.", skip_models=False))
            else:
                parts.append(_table(model, f"{name}.", skip_models=False))
    return "\n".join(parts)


def _table(model: type[BaseModel], prefix: str, skip_models: bool) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if skip_models and _is_model(info.annotation):
            rows.append(f"| `{prefix}{name}` | section | | {info.description} (below) |")
            continue
        if _union_models(info.annotation):
            rows.append(f"| `{prefix}{name}` | mapping | none | {info.description} (below) |")
            continue
        rows.append(f"| `{prefix}{name}` | {_type(info)} | {_default(info)} | {info.description} |")
    return "\n".join(rows) + "\n"


def _type(info: FieldInfo) -> str:
    text = _type_name(info.annotation)
    bounds: list[str] = []
    searchable = False
    for meta in info.metadata:
        if isinstance(meta, Searchable):
            searchable = True
            if isinstance(meta.scalar, NumberCheck):
                bounds += [f"{sign} {bound:g}" for sign, bound in meta.scalar.bounds()]
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(getattr(meta, attr, None), int | float):
                bounds.append(f"{sign} {getattr(meta, attr):g}")
        if isinstance(getattr(meta, "max_length", None), int):
            bounds.append(f"at most {meta.max_length} chars")
    if bounds:
        text += ", " + ", ".join(bounds)
    if searchable:
        text += ", *searchable*"
    return text.replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        names = [n for n in names if n]
        text = " or ".join(dict.fromkeys(names))
        return text + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and annotation.__module__.endswith("search_space"):
        return ""  # a search dimension: shown as *searchable*
    return {int: "int", float: "number", str: "string", bool: "bool"}.get(annotation, "")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default is PydanticUndefined:
        return ""
    value = info.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip()


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if _is_model(a)]
    return []


if __name__ == "__main__":
    print(render(), end="")
