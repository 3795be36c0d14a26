"""research: a small JAX/Flax codebase for training and studying neural networks."""
