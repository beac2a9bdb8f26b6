"""Checks of an untrusted uploaded LoRA adapter: its file, its tensors, and its round's peers.

A library like merge/ (it imports only protocol/ and numpy; no torch, so the coordinator's
request path stays light). Checks of an upload return `Issue`s naming what was wrong (a
tensor key or "file"/"header", expected vs got) and never raise on hostile content; only a
caller's own mistake raises `VerifyError`. Public API:

    expected.expected_adapter(model: ModelShape, lora: LoraSettings) -> ExpectedAdapter
        every key and shape the task implies (rank and modules from the task, not the upload)
    adapter.check_adapter(weights_path, expected, *, limits=None) -> AdapterCheck
        header (header.parse_header), exact key set, shapes, dtypes, finite values;
        .ok, .issues, and .factors (module -> Factors(a, b), float32) when ok
    adapter.coordinator_config(task: TrainTask, base_model_name_or_path: str) -> dict
        the adapter_config.json written from the task; the uploaded one is never read
    deltas.change_norm(upload, start) -> float / deltas.change_cosine(x, y, start) -> float
        ||B_s A_s - B_0 A_0||_F and cosines of changes, factored (no dense d x d matrix)
    bounds.overreach(upload, start, StepBudget(...)) -> Overreach | None
        the factor furthest past what the task's AdamW steps can move a value (a hard bound
        from Adam's worst-case step and the schedule: scaled-up deltas, random factors)
    review.review_round(uploads, start, *, thresholds=None) -> RoundReview
        per-shard flags (zero_change, fresh_init, replay, norm_high, norm_low, direction)
        from robust statistics over the round's K uploads; every constant is relative

Example (`start` is the round's start adapter's factors, None in round 0):

    from cotune.orchestrator.protocol.memory import ModelShape
    from cotune.orchestrator.verify.adapter import check_adapter, coordinator_config
    from cotune.orchestrator.verify.expected import expected_adapter
    from cotune.orchestrator.verify.review import review_round

    expected = expected_adapter(ModelShape.from_config(model_config), task.lora)
    checks = [check_adapter(path, expected) for path in uploaded_paths]
    for check in checks:
        if not check.ok:
            raise Rejected("adapter refused", issues=[issue.pair for issue in check.issues])
    review = review_round([c.factors for c in checks if c.factors], start)
    suspicious = {shard: review.flags_of(shard) for shard in review.flagged}
    config = coordinator_config(task, task.base_model)  # -> adapter_config.json

Modules: issues.py (Issue, VerifyError), header.py (the safetensors header, untrusted),
expected.py (the task's key set; Factors), adapter.py (one upload), deltas.py (factored
delta math), bounds.py (the optimizer's reach), review.py (the round's robust statistics).
"""
