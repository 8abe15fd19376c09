"""Settings read once (``zoo.settings.runtime_options`` → ``RuntimeOptions`` → ``OnnxModel.open``) and the
process-level helpers of ``zoo.io`` (one file lock, one ``pid_alive``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from zoo.io import file_lock, pid_alive
from zoo.runtime import RuntimeOptions, choose_providers, create_session, gpu_present, provider_options
from zoo.settings import runtime_options

CPU = "CPUExecutionProvider"


def test_every_variable_maps_to_its_option() -> None:
    env = {"MEDZOO_PROVIDERS": " CUDAExecutionProvider , CPUExecutionProvider ", "MEDZOO_TF32": "1",
           "MEDZOO_TRT_FP16": "1", "MEDZOO_TRT_CACHE": "/tmp/trt", "MEDZOO_ORT_SPINNING": "off",
           "CUDA_VISIBLE_DEVICES": "-1"}
    assert runtime_options(env) == RuntimeOptions(
        providers=("CUDAExecutionProvider", CPU), tf32=True, trt_fp16=True, trt_cache="/tmp/trt", spinning=False,
        visible_devices="-1")
    assert runtime_options({}) == RuntimeOptions()  # nothing set: the defaults
    assert runtime_options({"MEDZOO_TF32": "yes", "MEDZOO_ORT_SPINNING": "1"}) == RuntimeOptions()  # only "1" / off
    assert runtime_options({}, threads=2).threads == 2  # an entry point's own setting on top


def test_options_decide_providers_and_their_settings() -> None:
    assert not gpu_present(RuntimeOptions(visible_devices="")) and not gpu_present(RuntimeOptions(visible_devices="-1"))
    assert choose_providers(RuntimeOptions(providers=(CPU,))) == [CPU]
    assert choose_providers(RuntimeOptions(visible_devices="-1")) == [CPU]  # no GPU visible: the CPU only
    trt, cuda = "TensorrtExecutionProvider", "CUDAExecutionProvider"
    assert dict(provider_options([trt, cuda, CPU])) == {trt: {"trt_fp16_enable": "0"}, cuda: {"use_tf32": "0"}, CPU: {}}
    fast = RuntimeOptions(tf32=True, trt_fp16=True, trt_cache="/c")
    assert dict(provider_options([trt, cuda], fast)) == {
        trt: {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/c"},
        cuda: {"use_tf32": "1"}}


def _identity_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    return path


def test_session_follows_the_options(tmp_path: Path) -> None:
    path = _identity_onnx(tmp_path / "id.onnx")
    sess, got = create_session(path, RuntimeOptions(providers=(CPU,), threads=1, spinning=False))
    opts = sess.get_session_options()
    assert got == CPU and opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = create_session(path, RuntimeOptions(providers=(CPU,)))[0].get_session_options()
    assert default.intra_op_num_threads == 0  # ONNX Runtime's own choice
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set: ONNX Runtime's default (spin)
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_file_lock_is_exclusive_between_processes(tmp_path: Path) -> None:
    lock_path = tmp_path / "sub" / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from zoo.io import file_lock\n"
         f"lock = file_lock({str(lock_path)!r}); print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert file_lock(lock_path, blocking=False) is None  # another process holds it
        assert pid_alive(holder.pid)
        holder.communicate("\n", timeout=30)  # the holder exits: the kernel releases its lock
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not pid_alive(holder.pid)
    with file_lock(lock_path, blocking=False) as lock:  # free now
        assert lock is not None and lock.held
        assert file_lock(lock_path, blocking=False) is None  # exclusive within a process too (another open file)
    assert not lock.held
    with file_lock(lock_path):  # blocking: taken at once when free
        pass


def test_pid_alive_refuses_non_pids() -> None:
    assert not pid_alive(0) and not pid_alive(-1)
