"""Build script: the package metadata lives in pyproject.toml; this file builds native extensions."""

from setuptools import setup

setup()
