"""How long a merge's evaluation takes once its libraries are loaded, for bench/endtoend.py.

In the sweep each merge is evaluated by a fresh `cotune evaluate` process on Ray
(orchestrator/pipeline/roundmerge.py), which imports torch, transformers, PEFT and
bitsandbytes before it loads the model and scores the eval split. `probe_evaluate` runs one
fresh process that times those imports, then `cotune evaluate`'s evaluation of the base
model three times in the same (now warm) process, on the run's eval split and model cache,
with one torch thread as on Ray.

    python -m bench._evaluate_probe task.json eval.jsonl.zst <home>/models
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def probe_evaluate(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """What a merge's evaluation costs once the libraries are loaded: in a fresh process, the
    imports `cotune evaluate` makes, then its evaluation of the base model three times, on
    the run's eval split and model cache, one torch thread (as on Ray)."""
    home = folder / "home"
    split_file = next(home.glob("coordinator/*/eval/*"), None)
    if split_file is None or not record.get("task_json"):
        return {"skipped": "no eval split or task in the run's home"}
    task = folder / "probe-task.json"
    task.write_text(record["task_json"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "bench._evaluate_probe", str(task), str(split_file)]
    done = subprocess.run(
        [*argv, str(home / "models")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        return {"skipped": f"the probe failed: {done.stderr.strip()[-500:]}"}
    return dict(json.loads(line.removeprefix("RESULT ")))


def main(argv: list[str]) -> int:
    """The probe's process: `python -m bench._evaluate_probe TASK_JSON EVAL_FILE MODELS_DIR`."""
    task_file, eval_file, models_dir = (Path(a) for a in argv)
    started = time.perf_counter()
    import peft  # noqa: F401  (what `cotune evaluate` loads, lazily, inside its `seconds`)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401
    imports = time.perf_counter() - started
    from cotune.worker.evaluate import EvaluateOptions, check_options, evaluate

    options = EvaluateOptions(
        task=task_file,
        eval_file=eval_file,
        out=task_file.with_suffix(".out.json"),
        base_only=True,
        models_dir=models_dir,
    )
    task = check_options(options)
    runs = [float(evaluate(options, task)["seconds"]) for _ in range(3)]
    print("RESULT " + json.dumps({"imports_s": round(imports, 3), "evaluate_s": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
