"""Light, shared data models: the only part of orchestrator/ that worker/ may import."""
