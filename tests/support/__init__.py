"""Helpers shared by the tests: building small reference models with diffusers and saving them."""
