"""``zoo score``: offline batch scoring of image folders with the exported ONNX models.

Pipeline::

    FOLDER ─ listing (recursive, sorted relative paths) ─ fixed chunks of ``chunk_size`` files
      ─ worker processes read + decode a chunk (zoo.preprocess.load_image on the raw bytes)
      ─ batched ONNX Runtime inference (zoo.runtime.OnnxModel), while the workers already
        decode the next chunks
      ─ each finished chunk journalled atomically in ``<out>.partial/chunk-NNNNNN.json``
      ─ at the end: errors file and output (CSV, JSON Lines or Parquet) written atomically,
        journal removed.

Nothing is lost and nothing is written twice: a run killed at any point and started again
finds the journal, checks that it belongs to the same models and the same folder listing,
skips the chunks already there and scores the rest; the output is assembled from the journal
in chunk order, so a resumed run writes the same bytes as an uninterrupted one. A finished
run (output present, no journal) is a no-op unless ``overwrite``.

``zoo score --ray`` (:mod:`zoo.score.ray_run`, :func:`score_folder_ray`) runs the same journalled
run on a Ray cluster: Ray Data tasks decode the chunks, an actor pool runs ONNX Runtime, and this
process journals each chunk as it comes back, so the output is the same, byte for byte. Ray is
imported only when it runs (``pip install 'medzoo[ray]'``).

``ensemble``: members are chosen, checked and combined by :mod:`zoo.ensemble` (the service's
rules): the logits are averaged, then turned into probabilities; the ``agreement`` column is the
fraction of members whose own top class is the ensemble's.
"""

from zoo.score.decode import CRASH_REASON, decode_entries
from zoo.score.listing import SPECIAL, FileEntry, list_folder
from zoo.score.models import ensure_onnx, infer, open_models, resolve_models
from zoo.score.output import output_columns, output_format
from zoo.score.ray_run import score_folder_ray
from zoo.score.run import ScoreSummary, score_folder

__all__ = ["CRASH_REASON", "SPECIAL", "FileEntry", "ScoreSummary", "decode_entries",
           "ensure_onnx", "infer", "list_folder", "open_models", "output_columns",
           "output_format", "resolve_models", "score_folder", "score_folder_ray"]
