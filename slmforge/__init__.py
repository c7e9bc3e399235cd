"""slmforge: build, train, evaluate and ship small language models."""

__version__ = "0.1.0"
