"""snapgen_model: pure-PyTorch library (configs, networks, diffusion, distillation, data, evaluation, export)."""
