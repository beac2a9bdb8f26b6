"""LoRA adapter merging: one MergeStrategy per module, pure math apart.

Library entry point: `merger.merge_adapters(dirs, out, method="svd")` (or `plan_merge` then
`execute_merge`); command line: `cotune merge` (command.py). Layout: base.py (the
MergeStrategy protocol, LoraFactors, MergeError), registry.py (methods by name), one file
per method (svd.py, cat.py, linear.py, ties.py, dare.py), factored.py (the tensor math),
adapters.py (reading and checking PEFT folders, one module at a time), weights.py,
writer.py (streaming safetensors), card.py (output config and model card). The math and
its differences from PEFT are in docs/merging.md.
"""
