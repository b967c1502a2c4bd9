"""The shapes task and the tiny MobileVLM V2 trained on it (models/tiny-shapes).

`scenes`, `questions` and `dataset` are torch-free (images with numpy + PIL): the evaluation
through ONNX Runtime or TensorRT uses them on the Jetson. `train` and `reference` need the
host extra (torch).
"""
