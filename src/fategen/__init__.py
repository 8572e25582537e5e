"""fategen: an image-generation job service for chat bots, driving ComfyUI."""

__version__ = "0.1.0"
