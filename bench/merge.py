"""Merge benchmark: cotune's merges against PEFT's `add_weighted_adapter`, in the same run.

    python -m bench merge                  # K = 2, 8, 32; PEFT svd at 7B shapes for K = 8
    python -m bench merge --quick          # K = 2, 8; PEFT svd on 4096 x 4096 only
    python -m bench merge --peft-svd-ks=2,8,32   # PEFT svd at 7B shapes for every K (slow)

(a) Tiny-model adapters: K rank-16 adapters of the built-in tiny Llama (all 7 projections of
    its 2 layers). End to end: cotune `merge_adapters` (folders in, PEFT folder out) against
    PEFT (load base + K adapters, add_weighted_adapter, save_pretrained); PEFT's merge call
    alone is reported too.
(b) Single modules at LLaMA-7B shapes (4096 x 4096 and 11008 x 4096), K rank-16 pairs in
    memory: the merge call alone, cotune `svd`/`cat` against PEFT `svd`/`cat` on one Linear,
    with each result's relative Frobenius error against the exact dense weighted delta.
    PEFT's svd forms the dense delta and runs a full SVD: minutes per module on two cores,
    so by default it runs for K = 8 only (its cost hardly depends on K).
(c) A full 7B-shaped set: 8 adapters x 224 modules (32 layers x q,k,v,o 4096x4096,
    gate,up 11008x4096, down 4096x11008), rank 16, float32 safetensors on disk, merged by
    cotune `svd` in a fresh process. PEFT's time for the set is EXTRAPOLATED from (b).

Each (a)/(b) case runs in one fresh process, the sides alternating round by round; peak RSS
per call is sampled (psutil, 2 ms) above the RSS before the call. (c)'s peak RSS is the whole
process's (VmHWM, bench/_memory.py), imports included. Results: a table on stdout,
bench/out/merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._memory import peak_rss_mb

RANK = 16
ALPHA = 32
SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}
LLAMA7B = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
LAYERS = 32
FULL_K = 8
SPEEDUP_TARGET = 100.0
FULL_SECONDS_TARGET = 60.0
FULL_RSS_TARGET_MB = 2048.0
OUT = Path(__file__).parent / "out" / "merge.json"
ROOT = Path(__file__).parent.parent


class PeakRss:
    """Samples this process's RSS in a thread; `peak_mb` is the high-water mark above start."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start_mb = self.peak_mb = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)


def _timed(call: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    with PeakRss() as rss:
        start = time.perf_counter()
        value = call()
        seconds = time.perf_counter() - start
    return value, {
        "seconds": seconds,
        "peak_rss_mb": rss.peak_mb,
        "rss_increase_mb": rss.peak_mb - rss.start_mb,
    }


# ---- children: each runs in a fresh process and prints one JSON line --------------------


def _module_case(spec: dict[str, Any]) -> dict[str, Any]:
    """(b): one 7B-shaped module, K rank-16 pairs; sides interleaved for `rounds` rounds."""
    import torch
    from cotune.orchestrator.merge.base import LoraFactors
    from cotune.orchestrator.merge.registry import make_strategy

    d_out, d_in = SHAPES[spec["shape"]]
    k = spec["k"]
    generator = torch.Generator().manual_seed(k)
    factors = [
        LoraFactors(
            a=torch.randn(RANK, d_in, generator=generator) / d_in**0.5,
            b=torch.randn(d_out, RANK, generator=generator) / RANK**0.5,
            scale=ALPHA / RANK,
        )
        for _ in range(k)
    ]
    raw = torch.rand(k, generator=generator) + 0.5
    weights = (raw / raw.sum()).tolist()
    peft_model = _peft_single_module(factors, d_out, d_in)
    names = [f"a{i}" for i in range(k)]

    def ours(method: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        strategy = make_strategy(method, rank=RANK if method == "svd" else None)

        def call() -> tuple[torch.Tensor, torch.Tensor]:
            # One torch thread, as merge_adapters uses (merger.execute_merge says why);
            # PEFT keeps torch's default (two threads here), which can only favour it.
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                merged = strategy.merge(factors, weights, rank=RANK, module="m")
            finally:
                torch.set_num_threads(before)
            return merged.b, merged.a

        return call

    def theirs(method: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def call() -> tuple[torch.Tensor, torch.Tensor]:
            name = f"merged-{method}-{time.perf_counter_ns()}"
            kwargs = {"svd_rank": RANK} if method == "svd" else {}
            peft_model.add_weighted_adapter(names, weights, name, combination_type=method, **kwargs)
            layer = peft_model.base_model.model.proj
            b = layer.lora_B[name].weight.detach() * layer.scaling[name]
            a = layer.lora_A[name].weight.detach()
            peft_model.delete_adapter(name)
            return b, a

        return call

    sides = {"cotune svd": ours("svd"), "cotune cat": ours("cat"), "peft cat": theirs("cat")}
    if spec["peft_svd"]:
        sides["peft svd"] = theirs("svd")
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    products: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for round_ in range(spec["rounds"]):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            if side == "peft svd" and runs[side]:
                continue  # one run: minutes each
            products[side], figures = _timed(sides[side])
            runs[side].append(figures)
    exact = sum(
        w * f.scale * (f.b.double() @ f.a.double()) for f, w in zip(factors, weights, strict=True)
    )
    assert isinstance(exact, torch.Tensor)
    errors = {
        side: float((exact - b.double() @ a.double()).norm() / exact.norm())
        for side, (b, a) in products.items()
    }
    # The best rank-16 error (Eckart-Young) from the singular values of the exact delta.
    # It is B @ A with B = [w_i s_i B_i] (d_out x Kr) and A = [A_i] (Kr x d_in): with
    # B = Q_B R_B and A^T = Q_A R_A its singular values are those of the Kr x Kr R_B R_A^T,
    # seconds cheaper than a full SVD of the d_out x d_in matrix (tens of seconds each here).
    stacked_b = torch.cat(
        [w * f.scale * f.b.double() for f, w in zip(factors, weights, strict=True)], dim=1
    )
    stacked_a = torch.cat([f.a.double() for f in factors], dim=0)
    r_b = torch.linalg.qr(stacked_b, mode="r").R
    r_a = torch.linalg.qr(stacked_a.T, mode="r").R
    optimal = torch.linalg.svdvals(r_b @ r_a.T)
    return {
        "runs": runs,
        "errors": errors,
        "optimal_svd_error": float(optimal[RANK:].norm() / optimal.norm()),
    }


def _peft_single_module(factors: list[Any], d_out: int, d_in: int) -> Any:
    """A PeftModel on one Linear(d_in, d_out) holding the K pairs as adapters a0..a{K-1}."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])
    model = get_peft_model(One(), config, adapter_name="a0")
    for index in range(1, len(factors)):
        model.add_adapter(f"a{index}", config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for index, f in enumerate(factors):
            layer.lora_A[f"a{index}"].weight.copy_(f.a)
            layer.lora_B[f"a{index}"].weight.copy_(f.b)
    return model


def _adapters_case(spec: dict[str, Any]) -> dict[str, Any]:
    """(a): K tiny-model adapters from disk, end to end, sides interleaved."""
    import shutil

    import torch
    from cotune.orchestrator.merge.merger import merge_adapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = [Path(d) for d in spec["adapters"]]
    work = Path(spec["work"])

    def ours(method: str) -> Callable[[], dict[str, float]]:
        def call() -> dict[str, float]:
            out = work / f"ours-{method}"
            shutil.rmtree(out, ignore_errors=True)
            merge_adapters(dirs, out, method=method)
            return {}

        return call

    def theirs(method: str) -> Callable[[], dict[str, float]]:
        def call() -> dict[str, float]:
            out = work / f"peft-{method}"
            shutil.rmtree(out, ignore_errors=True)
            base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="a0")
            for index, path in enumerate(dirs[1:], start=1):
                model.load_adapter(str(path), adapter_name=f"a{index}")
            start = time.perf_counter()
            names = [f"a{i}" for i in range(len(dirs))]
            model.add_weighted_adapter(
                names, [1 / len(dirs)] * len(dirs), "merged", combination_type=method
            )
            merge_only = time.perf_counter() - start
            model.save_pretrained(str(out), selected_adapters=["merged"])
            return {"merge_call_seconds": merge_only}

        return call

    sides = {
        "cotune svd": ours("svd"),
        "peft svd": theirs("svd"),
        "cotune cat": ours("cat"),
        "peft cat": theirs("cat"),
    }
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for round_ in range(spec["rounds"]):
        for side in list(sides) if round_ % 2 == 0 else list(reversed(sides)):
            extra, figures = _timed(sides[side])
            runs[side].append({**figures, **extra})
    return {"runs": runs}


def _full_case(spec: dict[str, Any]) -> dict[str, Any]:
    """(c): the whole 7B-shaped set, cotune svd, files to files, in this fresh process."""
    import psutil
    from cotune.orchestrator.merge.merger import merge_adapters

    imported = psutil.Process().memory_info().rss / 2**20
    with PeakRss() as sampled:
        start = time.perf_counter()
        dirs = [Path(d) for d in spec["adapters"]]
        report = merge_adapters(dirs, Path(spec["out"]), method="svd")
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "modules": report.summary.modules,
        # The process's high-water mark (bench/_memory.py): imports and libraries included.
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": imported,
        "sampled_peak_rss_during_merge_mb": sampled.peak_mb,
    }


CHILDREN = {"module": _module_case, "adapters": _adapters_case, "full": _full_case}


def _run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.merge", f"--child={kind}", f"--spec={json.dumps(spec)}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- inputs --------------------------------------------------------------------------------


def _tiny_adapters(work: Path, count: int) -> tuple[Path, list[Path]]:
    import torch
    from cotune.worker.tinymodel import build_tiny_llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build_tiny_llama(work / "tiny-llama", seed=0)
    targets = [name.split(".")[-1] for name in LLAMA7B]
    folders = []
    for index in range(count):
        torch.manual_seed(index)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base)),
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False),
        )
        folder = work / f"tiny-{index}"
        model.save_pretrained(str(folder))
        (folder / "metrics.json").write_text(json.dumps({"tokens": 1000 + index}))
        folders.append(folder)
    return base, folders


def _llama7b_adapters(work: Path, count: int) -> list[Path]:
    """`count` rank-16 float32 adapters with LLaMA-7B's 224 LoRA targets (~160 MB each)."""
    import torch
    from safetensors.torch import save_file

    folders = []
    for index in range(count):
        generator = torch.Generator().manual_seed(1000 + index)
        tensors = {}
        for layer in range(LAYERS):
            for name, (d_out, d_in) in LLAMA7B.items():
                key = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, d_in, generator=generator)
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, RANK, generator=generator)
        folder = work / f"llama7b-{index}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": sorted(n.split(".")[-1] for n in LLAMA7B),
            "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "metrics.json").write_text(json.dumps({"tokens": 10_000 * (index + 1)}))
        folders.append(folder)
    return folders


# ---- the run -------------------------------------------------------------------------------


def _median(runs: list[dict[str, float]], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in runs)


def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"modules": [], "adapters": []}
    if "a" in args.parts:
        print(f"(a) tiny-model adapters, K = {args.ks}, {args.rounds} rounds", flush=True)
        base, tiny = _tiny_adapters(work, max(args.ks))
    for k in args.ks if "a" in args.parts else []:
        spec = {"adapters": [str(p) for p in tiny[:k]], "base": str(base), "work": str(work)}
        result = _run_child("adapters", {**spec, "rounds": args.rounds})
        figures["adapters"].append({"k": k, **result})
        print(f"  K={k:<3} " + _sides(result["runs"]), flush=True)
    if "b" in args.parts:
        print(f"(b) single modules at 7B shapes, K = {args.ks}", flush=True)
    for shape in SHAPES if "b" in args.parts else []:
        for k in args.ks:
            peft_svd = k in args.peft_svd_ks and not (args.quick and shape != "4096x4096")
            spec = {"shape": shape, "k": k, "rounds": args.rounds, "peft_svd": peft_svd}
            result = _run_child("module", spec)
            figures["modules"].append({"shape": shape, "k": k, **result})
            errors = ", ".join(f"{s} {e:.6f}" for s, e in result["errors"].items())
            print(f"  {shape} K={k:<3} {_sides(result['runs'])}\n      error: {errors}", flush=True)
    if "c" in args.parts:
        print(f"(c) full 7B-shaped set: {FULL_K} adapters x {LAYERS * len(LLAMA7B)} modules")
        folders = _llama7b_adapters(work, FULL_K)
        spec = {"adapters": [str(p) for p in folders], "out": str(work / "llama7b-merged")}
        figures["full"] = _run_child("full", spec)
        print(
            f"  cotune svd {figures['full']['seconds']:.1f} s, "
            f"peak RSS {figures['full']['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    figures["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }
    figures["setup"] = {"rank": RANK, "ks": args.ks, "rounds": args.rounds, "quick": args.quick}
    return figures


def _sides(runs: dict[str, list[dict[str, float]]]) -> str:
    return "  ".join(
        f"{side} {_median(r):.3f} s ({max(x['rss_increase_mb'] for x in r):.0f} MB)"
        for side, r in runs.items()
    )


def _summarise(figures: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups, error ratios, the extrapolation and the targets met."""
    svd_speedups: dict[str, float] = {}
    error_ratios: dict[str, float] = {}
    peft_svd_seconds: dict[str, float] = {}
    for case in figures["modules"]:
        runs, errors = case["runs"], case["errors"]
        if "peft svd" in runs and case["k"] == FULL_K:
            label = case["shape"]
            peft_svd_seconds[label] = _median(runs["peft svd"])
            svd_speedups[label] = peft_svd_seconds[label] / _median(runs["cotune svd"])
            error_ratios[label] = errors["cotune svd"] / errors["peft svd"]
    per_layer = {
        name: peft_svd_seconds.get("x".join(map(str, sorted(shape, reverse=True))))
        for name, shape in LLAMA7B.items()
    }
    known = [s for s in per_layer.values() if s is not None]
    # Missing shapes (quick mode) take the 4096 x 4096 time: a lower bound for PEFT.
    fallback = min(known) if known else None
    extrapolated = (
        LAYERS * sum(s if s is not None else fallback for s in per_layer.values())
        if fallback is not None
        else None
    )
    met: dict[str, bool] = {}
    if figures["modules"]:
        met["svd >= 100x faster than PEFT svd at 7B shapes (K=8)"] = (
            bool(svd_speedups) and min(svd_speedups.values()) >= SPEEDUP_TARGET
        )
        met["svd error <= PEFT svd error"] = (
            bool(error_ratios) and max(error_ratios.values()) <= 1 + 1e-4
        )
    if "full" in figures:
        met["full 7B set < 60 s"] = figures["full"]["seconds"] < FULL_SECONDS_TARGET
        met["full 7B set peak RSS < 2 GB"] = figures["full"]["peak_rss_mb"] < FULL_RSS_TARGET_MB
    return {
        "svd_speedup_k8": svd_speedups,
        "svd_error_ratio_k8": error_ratios,
        "peft_svd_full_set_seconds_extrapolated": extrapolated,
        "peft_svd_extrapolation_is_lower_bound": len(known) < len(per_layer),
        "targets_met": met,
    }


def _report(figures: dict[str, Any]) -> bool:
    summary = figures["summary"]
    lines = [
        "",
        f"merge, {figures['machine']['cpus']} CPUs, rank {RANK}",
    ]
    if figures["adapters"]:
        lines.append("(a) tiny Llama adapters, end to end, median s (peak RSS increase)")
    for case in figures["adapters"]:
        runs = case["runs"]
        call = _median(runs["peft svd"], "merge_call_seconds")
        lines.append(
            f"  K={case['k']:<3} {_sides(runs)}  | peft svd call alone {call:.3f} s; "
            f"svd ratio {_median(runs['peft svd']) / _median(runs['cotune svd']):.1f}x, "
            f"cat ratio {_median(runs['peft cat']) / _median(runs['cotune cat']):.1f}x"
        )
    if figures["modules"]:
        lines.append("(b) single 7B-shaped modules, merge call, median s (peak RSS increase)")
    for case in figures["modules"]:
        lines.append(f"  {case['shape']:<11} K={case['k']:<3} {_sides(case['runs'])}")
    extrapolated = summary["peft_svd_full_set_seconds_extrapolated"]
    if figures["modules"]:
        lines += [
            f"svd speed-up over PEFT svd at K={FULL_K}: "
            + ", ".join(f"{s} {v:.0f}x" for s, v in summary["svd_speedup_k8"].items()),
            "svd error / PEFT svd error: "
            + ", ".join(f"{s} {v:.8f}" for s, v in summary["svd_error_ratio_k8"].items()),
        ]
    if "full" in figures:
        full = figures["full"]
        lines.append(
            f"(c) full 7B set ({full['modules']} modules, K={FULL_K}): cotune svd "
            f"{full['seconds']:.1f} s, peak RSS {full['peak_rss_mb']:.0f} MB (after imports "
            f"{full['rss_after_imports_mb']:.0f} MB, sampled during the merge "
            f"{full['sampled_peak_rss_during_merge_mb']:.0f} MB); PEFT svd "
            + (
                f"EXTRAPOLATED {extrapolated / 3600:.1f} h"
                + (" (lower bound)" if summary["peft_svd_extrapolation_is_lower_bound"] else "")
                if extrapolated
                else "not measured"
            )
        )
    lines += [f"  [{'ok' if ok else 'MISSED'}] {t}" for t, ok in summary["targets_met"].items()]
    print("\n".join(lines))
    return all(summary["targets_met"].values())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench merge", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="K = 2, 8; PEFT svd on 4096 only")
    parser.add_argument("--rounds", type=int, help="rounds per side [3; quick: 2]")
    parser.add_argument(
        "--peft-svd-ks", default=str(FULL_K), help=f"K values for PEFT svd at 7B shapes [{FULL_K}]"
    )
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run [abc]")
    parser.add_argument("--out", type=Path, default=OUT, help=f"figures file [{OUT}]")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.spec))))
        return 0
    args.ks = [2, 8] if args.quick else [2, 8, 32]
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.peft_svd_ks = [int(k) for k in args.peft_svd_ks.split(",")]
    with tempfile.TemporaryDirectory(prefix="cotune-bench-merge-") as tmp:
        figures = _measure(args, Path(tmp))
    figures["summary"] = _summarise(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    met = _report(figures)
    print(f"figures written to {args.out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
