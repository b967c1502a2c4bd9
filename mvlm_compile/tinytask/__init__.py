"""The shapes task, made in code: the data the embedded tiny MobileVLM V2 (models/tiny-shapes) is trained on.

`scenes` draws the images, `questions` the v1-template questions and short answers, and
`dataset` the fixed train and held-out eval splits. All torch-free (numpy + PIL), so that an
evaluation through ONNX Runtime or TensorRT can run them on the Jetson. `train` (torch) trains
the model on them.
"""
