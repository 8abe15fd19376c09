"""medzoo: a model zoo for medical image classification."""

from zoo._version import __version__

__all__ = ["__version__"]
