"""TensorRT engine building: the memory plan and profiles (plan.py) and the builder (builder.py)."""
