"""Kata 1.x agent wire protocol: .proto sources and the modules generated from them."""
