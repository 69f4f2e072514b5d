"""MNIST train / evaluate / infer: the code behind the mnist-compose services."""

__version__ = "0.1.0"
