"""lorabake: stream-bake LoRA adapters into diffusion checkpoints."""

__version__ = "0.1.0"
