"""LoRA adapter merging: one MergeStrategy per module, pure math apart."""
