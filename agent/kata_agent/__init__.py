"""Kata Containers guest agent speaking the 1.x gRPC protocol."""

__version__ = "0.1.0"
