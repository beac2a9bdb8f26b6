"""cotune worker agent: QLoRA training on volunteer and cluster GPUs."""
