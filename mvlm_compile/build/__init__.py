"""Building TensorRT engines and the plugin libraries they need."""
