"""The shapes task, made in code: the data a tiny MobileVLM V2 is to be trained on (issue 14).

`scenes` draws the images, `questions` the v1-template questions and short answers, and
`dataset` the fixed train and held-out eval splits. All torch-free (numpy + PIL), so that an
evaluation through ONNX Runtime or TensorRT can run them on the Jetson. The training script and
the trained checkpoint are not in the repository yet.
"""
