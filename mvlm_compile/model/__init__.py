"""The model stage: MobileVLM V2's definition, checkpoint loading, the PyTorch reference,
synthetic checkpoints and golden tensors.

`config` and `preprocess`/`prompt` are torch-free (the Jetson runtime uses them);
the other modules need the `host` extra (torch, transformers, safetensors).
"""
