"""Serving a bundle with Triton Inference Server: a model repository made from a bundle
(repository.py), the Python backend model that answers through mvlm_compile.Session (model.py,
copied into the repository), and a CPU tritonserver from nvidia-pytriton's wheel to run it
locally and in CI (server.py)."""
