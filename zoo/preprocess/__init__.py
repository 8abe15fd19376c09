"""The one definition of preprocessing, in parts:

* :mod:`zoo.preprocess.spec`: :class:`Preprocessing`, what a card and an export record;
* :mod:`zoo.preprocess.image`: files, decoded images and arrays → ``uint8 (C, H, W)`` arrays
  (Pillow, no torch), used by serving, scoring, the Python API and the image-folder datasets;
* :mod:`zoo.preprocess.dicom`: DICOM → 8-bit grey / RGB (pydicom, imported when DICOM shows up);
* :mod:`zoo.preprocess.header`: what a header says (``ImageHeader``) and the limits checked on it,
  shared by ``image`` and ``dicom``;
* :mod:`zoo.preprocess.adapter`: :class:`~zoo.preprocess.adapter.InputAdapter`, arrays → the
  network's normalised input (torch), inside every trained and exported model.

Importing this package does not import torch.
"""

from zoo.errors import ImageError
from zoo.preprocess.header import MAX_PIXELS, ImageHeader, Window
from zoo.preprocess.image import (
    ImageSource,
    ImageTransform,
    array_to_image,
    convert_mode,
    load_image,
    probe,
    stack_images,
)
from zoo.preprocess.spec import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_PIXELS", "ImageError", "ImageHeader", "ImageSource", "ImageTransform",
           "Preprocessing", "Window", "array_to_image", "convert_mode", "load_image", "probe", "stack_images"]
