"""The merge driver: plan (validate everything, read no data), then stream modules to the output.

    from cotune.orchestrator.merge.merger import merge_adapters
    report = merge_adapters([Path("a"), Path("b")], Path("merged"), method="svd")

A merge writes into a hidden sibling folder and renames it into place at the end, so a
failure part-way (a NaN found in module 180 of 224) leaves no output and no partial files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cotune.orchestrator.merge.adapters import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    Adapter,
    ModuleSpec,
    check_compatible,
    load_module,
    read_adapter,
)
from cotune.orchestrator.merge.base import MergeError, MergeStrategy
from cotune.orchestrator.merge.card import MergeSummary, merged_config, merged_tokens, model_card
from cotune.orchestrator.merge.registry import DEFAULT_METHOD, make_strategy
from cotune.orchestrator.merge.weights import Weights, resolve_weights

log = logging.getLogger(__name__)

#: progress(modules_done, modules_total, module_name) after each module.
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: inputs, method, weights and output rank; no tensor data read yet."""

    adapters: tuple[Adapter, ...]
    strategy: MergeStrategy
    weights: Weights
    rank: int
    warnings: tuple[str, ...]

    @property
    def modules(self) -> tuple[ModuleSpec, ...]:
        return self.adapters[0].modules

    def output_dtype(self, module: str) -> str:
        """The inputs' dtype for `module` when they agree, else float32."""
        dtypes = {a.module(module).dtype for a in self.adapters}
        return dtypes.pop() if len(dtypes) == 1 else "F32"


@dataclass(frozen=True)
class MergeReport:
    """What a finished merge wrote."""

    out: Path
    summary: MergeSummary
    seconds: float
    warnings: tuple[str, ...]


def plan_merge(
    adapter_dirs: Sequence[Path],
    *,
    method: str = DEFAULT_METHOD,
    rank: int | None = None,
    weights: str | Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
) -> MergePlan:
    """Check options, adapters and weights; every structural error surfaces here."""
    strategy = make_strategy(method, rank=rank, density=density, seed=seed)
    if not adapter_dirs:
        raise MergeError("no adapters given: name at least one PEFT adapter folder")
    adapters = tuple(read_adapter(Path(d)) for d in adapter_dirs)
    check_compatible(adapters)
    resolved = resolve_weights(adapters, weights)
    warnings = [resolved.warning] if resolved.warning else []
    out_rank = 0
    for spec in adapters[0].modules:
        ranks = [a.module(spec.name).rank for a in adapters]
        try:
            out_rank = max(out_rank, strategy.output_rank(ranks))
        except MergeError as err:
            raise MergeError(f"module {spec.name}: {err}") from None
    if rank is not None and strategy.exact:
        most = max(sum(a.module(s.name).rank for a in adapters) for s in adapters[0].modules)
        if rank > most:
            warnings.append(
                f"--rank {rank} is above the inputs' total rank ({most}); the merged delta has "
                "rank at most that, so the extra components are zeros"
            )
    for warning in warnings:
        log.warning(warning)
    return MergePlan(
        adapters=adapters,
        strategy=strategy,
        weights=resolved,
        rank=out_rank,
        warnings=tuple(warnings),
    )


def execute_merge(
    plan: MergePlan,
    out: Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    threads: int | None = 1,
) -> MergeReport:
    """Merge module by module into `out` (a PEFT adapter folder); all or nothing.

    `threads`: torch threads while merging (restored after); None leaves torch's setting.
    The default is 1 because a merge is thousands of millisecond-sized operations, and on a
    shared machine each multi-threaded one waits for every thread to be scheduled: the full
    7B-shaped benchmark took 6-17 s on one thread and 107-123 s on two at a load average of
    5 on two cores (5.2 s against 6 s in favour of two threads when the machine was idle).
    """
    started = time.perf_counter()
    _check_out(plan, out, overwrite)
    with _torch_threads(threads):
        summary = _stream(plan, out, command, progress)
    return MergeReport(
        out=out, summary=summary, seconds=time.perf_counter() - started, warnings=plan.warnings
    )


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stream(
    plan: MergePlan, out: Path, command: str | None, progress: Progress | None
) -> MergeSummary:
    from cotune.orchestrator.merge.factored import pad_rank
    from cotune.orchestrator.merge.writer import StreamingSafetensorsWriter, TensorSlot

    created = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        slots: list[TensorSlot] = []
        for spec in plan.modules:
            dtype = plan.output_dtype(spec.name)
            slots.append(TensorSlot(spec.key_a, dtype, (plan.rank, spec.d_in)))
            slots.append(TensorSlot(spec.key_b, dtype, (spec.d_out, plan.rank)))
        total = len(plan.modules)
        with StreamingSafetensorsWriter(
            staging / WEIGHTS_FILE, slots, {"format": "pt", "cotune_merge": plan.strategy.name}
        ) as writer:
            for done, spec in enumerate(plan.modules, start=1):
                factors = load_module(plan.adapters, spec.name)
                merged = plan.strategy.merge(
                    factors, plan.weights.values, rank=plan.rank, module=spec.name
                )
                merged = pad_rank(merged, plan.rank)
                writer.write(spec.key_a, merged.a)
                writer.write(spec.key_b, merged.b)
                del factors, merged
                if progress is not None:
                    progress(done, total, spec.name)
        summary = MergeSummary(
            method=plan.strategy.name,
            description=plan.strategy.description,
            exact=plan.strategy.exact,
            rank=plan.rank,
            weights=plan.weights.values,
            weight_source=plan.weights.source,
            modules=total,
            command=command,
        )
        _write_metadata(plan, staging, summary)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return summary


def merge_adapters(
    adapter_dirs: Sequence[Path],
    out: Path,
    *,
    method: str = DEFAULT_METHOD,
    rank: int | None = None,
    weights: str | Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    threads: int | None = 1,
) -> MergeReport:
    """Plan and execute a merge: the library entry point (the coordinator's merge step)."""
    plan = plan_merge(
        adapter_dirs, method=method, rank=rank, weights=weights, density=density, seed=seed
    )
    return execute_merge(plan, out, overwrite=overwrite, progress=progress, threads=threads)


def _check_out(plan: MergePlan, out: Path, overwrite: bool) -> None:
    target = out.resolve()
    for adapter in plan.adapters:
        source = adapter.path.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise MergeError(
                f"--out: {out} overlaps input adapter {adapter.path}; write the merge elsewhere"
            )
    if out.exists():
        if not out.is_dir():
            raise MergeError(f"--out: {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise MergeError(
                f"--out: {out} exists and is not empty; choose a new folder or remove it first"
            )


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to `folder` that does not exist yet (to undo mkdir)."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _write_metadata(plan: MergePlan, folder: Path, summary: MergeSummary) -> None:
    import json

    config = merged_config(plan.adapters, plan.rank)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(model_card(plan.adapters, summary))
    tokens = merged_tokens(plan.adapters)
    if tokens is not None:
        (folder / METRICS_FILE).write_text(json.dumps({"tokens": tokens}) + "\n")


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    # An existing folder (empty, or overwrite=True): swap, then delete the old one, so `out`
    # is never missing its files in between for longer than two renames.
    retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
