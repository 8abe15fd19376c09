"""ONNX export of ``Sequential(InputAdapter, net)`` through the ``torch.export``-based exporter.

``torch.onnx.export(..., dynamo=True)`` (the default path of torch 2.9 and later) with a
``torch.export.Dim`` on the batch axis: the file takes ``images`` uint8 ``[batch, C, S, S]`` and
returns ``logits`` float32 ``[batch, K]``. The fp16 variant converts weights and compute of the
network to float16 with ONNX Runtime's converter (``keep_io_types``: uint8 in, float32 out) and
keeps the input adapter (uint8 → [0, 1], resize, normalisation) in float32, so the
normalisation is computed exactly as in training and only then cast to float16.
"""

from __future__ import annotations

import ast
import contextlib
import heapq
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from zoo.card import ExportMeta
from zoo.errors import ExportError, ModelFileError
from zoo.io import atomic_write_bytes
from zoo.preprocess import Preprocessing
from zoo.runtime import METADATA_KEY, OOD_OUTPUT, check_onnx

DEFAULT_OPSET = 18
MIN_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXAMPLE_BATCH = 2  # not 0 or 1: torch.export specialises those sizes


def example_input(prep: Preprocessing, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """A deterministic uint8 batch of the exported input shape."""
    gen = torch.Generator().manual_seed(0)
    shape = (batch, prep.in_channels, prep.image_size, prep.image_size)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def to_onnx(model: nn.Module, prep: Preprocessing, opset: int = DEFAULT_OPSET,
            outputs: Sequence[str] = (OUTPUT_NAME,)) -> onnx.ModelProto:
    """Export the full model (adapter + net, eval mode) with a dynamic batch axis; ``outputs``
    names the model's outputs (``logits``, and ``ood_score`` for a model with a detector)."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: medzoo exports use opset {MIN_OPSET} or newer")
    model = model.eval()
    batch = torch.export.Dim("batch")
    chatter = io.StringIO()  # the exporter prints its progress on stdout
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example_input(prep),),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_shapes=({0: batch},),
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # torch.export / onnxscript raise many unrelated exception types
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {_first_line(e)}") from e
    if program is None:
        raise ExportError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    got = opset_of(proto)
    if got < MIN_OPSET:
        raise ExportError(f"the exporter produced opset {got}, below {MIN_OPSET}")
    return proto


def output_names(bundle: Any) -> tuple[str, ...]:
    """``logits``, plus ``ood_score`` when the bundle has an out-of-distribution detector."""
    return (OUTPUT_NAME, OOD_OUTPUT) if bundle.scored is not None else (OUTPUT_NAME,)


def opset_of(proto: onnx.ModelProto) -> int:
    """The default-domain opset of a model."""
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


# Module scopes kept in float32 by the fp16 export: the InputAdapter (child 0 of the Sequential, or
# of ScoredModel.model) and the out-of-distribution scorer (Mahalanobis distances lose too much in fp16).
_FP32_SCOPES = (("0",), ("model", "model.0"), ("scorer",))


def adapter_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float32: the ``InputAdapter``'s and the OOD scorer's.

    Read from the module scopes the torch exporter records in each node's metadata; an exporter
    that records none gives an empty list (the adapter then runs in float16 too).
    """
    names = []
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            parsed = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        if isinstance(parsed, list) and any(tuple(parsed[1 : 1 + len(sc)]) == sc for sc in _FP32_SCOPES):
            names.append(node.name)
    return names


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and compute; uint8 input and float32 outputs kept; adapter and OOD scorer kept float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = onnx.ModelProto()
    src.CopyFrom(proto)
    blocked = adapter_nodes(src)
    try:
        half = convert_float_to_float16(src, keep_io_types=True, node_block_list=blocked)
    except Exception as e:  # the converter asserts and raises on what it cannot convert
        raise ExportError(f"float16 conversion failed: {type(e).__name__}: {_first_line(e)}") from e
    _drop_round_trip_casts(half.graph, set(blocked))
    _topological_sort(half.graph)
    return half


def _drop_round_trip_casts(graph: onnx.GraphProto, blocked: set[str]) -> None:
    """Remove the float32 → float16 → float32 Cast pairs the converter puts between two float32
    (blocked) nodes, so the adapter's intermediate values never pass through float16, and its
    no-op casts of float32 initializers."""

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    nodes = list(graph.node)  # one wrapper per node: indices below refer to this list
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    blocked_outputs = {o for n in nodes if n.name in blocked for o in n.output}
    float_initializers = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for i, node in enumerate(nodes):
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        if node.input[0] in float_initializers:  # a no-op cast of a weight left in float32
            rename[node.output[0]] = node.input[0]
            dropped.add(i)
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(nodes[first]) != onnx.TensorProto.FLOAT16:
            continue
        if nodes[first].input[0] in blocked_outputs:
            if node.output[0] in graph_outputs:  # keep the output's name: cast the float32 value itself
                node.input[0] = nodes[first].input[0]
                continue
            rename[node.output[0]] = nodes[first].input[0]  # the float32 value before the round trip
            dropped.add(i)
    for i, n in enumerate(nodes):
        if i not in dropped:
            for k, name in enumerate(n.input):
                if name in rename:
                    n.input[k] = rename[name]
    used = {x for i, n in enumerate(nodes) if i not in dropped for x in n.input} | {o.name for o in graph.output}
    for i, n in enumerate(nodes):
        if cast_to(n) == onnx.TensorProto.FLOAT16 and n.input[0] in blocked_outputs and n.output[0] not in used:
            dropped.add(i)
    keep = []
    for i, n in enumerate(nodes):
        if i not in dropped:
            keep.append(onnx.NodeProto())
            keep[-1].CopyFrom(n)
    del graph.node[:]
    graph.node.extend(keep)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is used (stable; the converter appends
    its Cast nodes at the end of the graph, which the ONNX checker refuses)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, k in enumerate(pending) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ExportError("the float16 graph has a cycle; it cannot be ordered")
    ordered = [onnx.NodeProto() for _ in order]
    for dst, i in zip(ordered, order, strict=True):
        dst.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(ordered)


def attach_metadata(proto: onnx.ModelProto, meta: ExportMeta) -> None:
    """Store ``meta`` as JSON in ``metadata_props`` under :data:`zoo.runtime.METADATA_KEY`."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta.model_dump(mode="json"), sort_keys=True)
    proto.doc_string = f"medzoo export of {meta.id} ({meta.arch}): uint8 NCHW images in, logits out"


def write_onnx(proto: onnx.ModelProto, meta: ExportMeta, dest: Path) -> None:
    """Attach the metadata, run the ONNX checker, write the file atomically."""
    attach_metadata(proto, meta)
    try:
        check_onnx(proto, dest.name)
    except ModelFileError as e:
        raise ExportError(f"the exported graph is invalid: {e}") from None
    try:
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf refuses messages above 2 GiB
        raise ExportError(f"cannot serialise {dest.name}: {_first_line(e)}") from None
    atomic_write_bytes(dest, data)


__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OOD_OUTPUT", "OUTPUT_NAME", "adapter_nodes", "attach_metadata",
           "example_input", "opset_of", "output_names", "to_fp16", "to_onnx", "write_onnx"]
