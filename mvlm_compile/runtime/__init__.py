"""The runtime: one pipeline (pre-processing, vision, projector, prefill, decode) over a backend. Torch-free."""
