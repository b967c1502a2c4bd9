"""The verify stage: compare graphs and engines with the golden tensors. Torch-free."""
