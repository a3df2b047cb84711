"""abmll: Amortized Bayesian Meta-Learning of LoRA adapters for large language models."""

__version__ = "0.1.0"
