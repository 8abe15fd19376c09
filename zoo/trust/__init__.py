"""Predictions a clinician can weigh: calibrated probabilities and an out-of-distribution flag.

* :mod:`zoo.trust.calibration` — temperature scaling (Guo et al., ICML 2017) fitted with
  scikit-learn's implementation, ECE / Brier / NLL, the binary decision threshold, reliability
  diagrams (numpy, scikit-learn, matplotlib; no torch).
* :mod:`zoo.trust.ood` — the out-of-distribution detector: multi-layer Mahalanobis distance on
  spatially pooled activations (Lee et al., NeurIPS 2018, without input perturbation), with
  Ledoit-Wolf covariances; a torch module that exports with the network, so the ONNX file
  returns ``ood_score`` beside ``logits``.
* :mod:`zoo.trust.fit` — fitting both for a bundle on its own validation split (train split for
  the OOD statistics), recording them in the card: called by ``zoo train`` and ``zoo calibrate``.

Applying them is not here: :func:`zoo.postprocess.interpret` turns logits and the OOD score into
the answer, with the temperature and threshold that the card (or the export's metadata) carries.
"""
