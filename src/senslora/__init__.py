"""senslora: Sensitivity-LoRA rank allocation for PEFT."""

__version__ = "0.1.0"
