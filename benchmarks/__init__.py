"""Ratio benchmarks: keras_lora vs Keras's built-in LoRA vs full fine-tuning.

Run `python -m benchmarks.run_all --quick` from the repository root; see
`benchmarks/README.md`.
"""
