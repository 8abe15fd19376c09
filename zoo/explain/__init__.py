"""Explanations: where did the model look? (torch; an application, like training and export).

* :mod:`zoo.explain.maps`: :class:`Explainer` — Grad-CAM (pytorch-grad-cam) at the registry's
  ``cam_layer`` for convolutional networks, gradient saliency (Captum) for MLPs;
* :mod:`zoo.explain.render`: heat map and overlay images (PNG);
* :mod:`zoo.explain.files`: ``zoo explain BUNDLE IMAGE... --out DIR``.

The ONNX prediction path never imports this package; the service explains in a worker of its
own (``serving.explainer``).
"""

from zoo.explain.files import ExplainedImage, describe_image, explain_files
from zoo.explain.maps import GRAD_CAM, SALIENCY, BinaryLogitTarget, Explainer, Explanation, resolve_target
from zoo.explain.render import colour_map, overlay, png_bytes, view_size

__all__ = ["GRAD_CAM", "SALIENCY", "BinaryLogitTarget", "ExplainedImage", "Explainer", "Explanation", "colour_map",
           "describe_image", "explain_files", "overlay", "png_bytes", "resolve_target", "view_size"]
