"""medzoo: a model zoo for medical image classification."""

__version__ = "0.1.0"
