"""The merged adapter's metadata: its adapter_config.json, model card README.md, metrics.json."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cotune.orchestrator.merge.adapters import Adapter


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did, for the model card and the caller's report."""

    method: str
    description: str
    exact: bool
    rank: int
    weights: tuple[float, ...]
    weight_source: str
    modules: int
    command: str | None = None


def merged_config(adapters: Sequence[Adapter], rank: int) -> dict[str, Any]:
    """Adapter 0's config with the scale made 1: r = lora_alpha = rank, no rsLoRA or patterns.

    The factors written hold sum_k w_k s_k B_k A_k itself, so the scaling PEFT applies on
    load must be lora_alpha / r = 1. target_modules: the inputs' own when they agree, else
    their union (lists) or alternation (regex strings), as PEFT's add_weighted_adapter does.
    init_lora_weights is set to True so a module PEFT targets but the file lacks starts at a
    zero delta rather than at random.
    """
    config = dict(adapters[0].raw_config)
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
        inference_mode=True,
    )
    targets = [a.raw_config.get("target_modules") for a in adapters]
    if any(t != targets[0] for t in targets):
        if all(isinstance(t, list) for t in targets):
            config["target_modules"] = sorted({m for t in targets for m in t or []})
        else:
            config["target_modules"] = "|".join(_as_regex(t) for t in targets)
    return config


def _as_regex(targets: str | list[str] | None) -> str:
    """PEFT's target_modules as one regex: a string already is one (full match); a list
    matches a module whose path is a name or ends in "." + a name."""
    if isinstance(targets, str):
        return f"({targets})"
    return f"((.*\\.)?({'|'.join(re.escape(name) for name in targets or [])}))"


def merged_tokens(adapters: Sequence[Adapter]) -> int | None:
    """The merged adapter's training tokens (their sum), so merges of merges weight right."""
    tokens = [a.tokens for a in adapters]
    return sum(t for t in tokens if t is not None) if all(t is not None for t in tokens) else None


def model_card(adapters: Sequence[Adapter], summary: MergeSummary) -> str:
    """README.md: what the merge was, from what, with what weights, and how to load it."""
    base = adapters[0].config.base_model_name_or_path
    kind = "exact" if summary.exact else "approximate"
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {base}")
    lines += [
        "tags:",
        "- lora",
        "- cotune",
        f"- merge-{summary.method}",
        "---",
        "",
        "# Merged LoRA adapter",
        "",
        f"Merged by cotune from {len(adapters)} LoRA adapter(s) with method "
        f"`{summary.method}` ({kind}): {summary.description}.",
        "",
        f"- Base model: `{base}`" if base else "- Base model: not recorded by the inputs",
        f"- Output rank: {summary.rank}; lora_alpha = r, so the factors carry the whole delta "
        "(scale 1)",
        f"- Modules: {summary.modules}",
        f"- Weights: {summary.weight_source}, normalised to sum to 1 (a weighted mean)",
    ]
    if summary.command:
        lines.append(f"- Command: `{summary.command}`")
    lines += [
        "",
        "| # | adapter | r | lora_alpha | rsLoRA | tokens | weight |",
        "|---|---------|---|------------|--------|--------|--------|",
    ]
    for index, (adapter, weight) in enumerate(zip(adapters, summary.weights, strict=True)):
        cfg = adapter.config
        tokens = "-" if adapter.tokens is None else f"{adapter.tokens:,}"
        lines.append(
            f"| {index} | `{adapter.path}` | {cfg.r} | {cfg.lora_alpha:g} | "
            f"{'yes' if cfg.use_rslora else 'no'} | {tokens} | {weight:.6g} |"
        )
    lines += [
        "",
        "Load it like any PEFT adapter:",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'path/to/this/folder')",
        "```",
        "",
    ]
    return "\n".join(lines)
