"""Training, export, quantization and evaluation of the demo model shipped in ktransformers/demo."""
