"""The serving configuration (serving/config.py): one list of settings, ``ServeConfig``'s fields,
which the README's table, the module docstring and the packaged settings are checked against; tasks
in their own section; unknown keys refused; environment over file over defaults."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import yaml

import serving.config
from serving.config import SECTIONS, SETTINGS, SHORTHAND_TASKS, ServeConfig, load_config
from serving.package import HOST_SETTINGS, PACKAGED_SETTINGS
from zoo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FIELDS = ServeConfig.model_fields


@pytest.fixture(autouse=True)
def _no_serving_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the serving variables it means (the developer's own must not leak in)."""
    settings_env = {f"MEDZOO_{name.upper()}" for name in SETTINGS}
    for key in list(os.environ):
        if key.startswith(("MEDZOO_SERVE_", "MEDZOO_ENSEMBLE_")) or key in settings_env:
            monkeypatch.delenv(key)
    monkeypatch.setenv("MEDZOO_SERVE_SOURCE", "store")


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "serve.yaml"
    f.write_text(text)
    return f


def _shown(name: str) -> str:
    """A setting's default as the README and YAML write it (``null``, ``true``, ``64``)."""
    return json.dumps(FIELDS[name].default)


# --------------------------------------------------------------------------- one list of settings


def _readme_rows() -> dict[str, list[str]]:
    """The README's serving configuration table: key → its cells (a row may name several keys)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("Configuration (YAML at `--config`"):text.index("Environment also: `MEDZOO_SERVE_")]
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows[key] = cells
    return rows


def test_readme_table_shows_every_setting_with_its_default_and_description() -> None:
    assert all(FIELDS[n].description for n in SETTINGS), "every setting needs Field(description=...)"
    rows = _readme_rows()
    expected = {n: [f"`{n}`", _shown(n), str(FIELDS[n].description)] for n in SETTINGS}
    wrong = {n: f"| {' | '.join(cells)} |" for n, cells in expected.items() if rows.get(n) != cells}
    assert not wrong, "README rows to write (from ServeConfig's fields):\n" + "\n".join(wrong.values())
    for section in SECTIONS:
        assert rows[section][2] == FIELDS[section].description
    assert set(rows) == {*SECTIONS, *SHORTHAND_TASKS, *SETTINGS}, "a README row names no setting"


def test_readme_yaml_example_loads(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    example = textwrap.dedent(text.split("an unknown one stops the server:\n\n", 1)[1].split("\n\n", 1)[0])
    cfg = load_config(_write(tmp_path, example))
    assert cfg.tasks["breast"] and "chest" in cfg.tasks and cfg.max_file_mb == 30


def _docstring_yaml() -> str:
    """The YAML block of serving/config.py's docstring (after ``YAML layout …::``)."""
    doc = str(serving.config.__doc__)
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]  # up to the first blank line
    return textwrap.dedent(block)


def test_docstring_yaml_names_every_setting_with_its_default_and_loads(tmp_path: Path) -> None:
    example = yaml.safe_load(_docstring_yaml())
    assert set(example) == {*SECTIONS, *SHORTHAND_TASKS, *SETTINGS}
    assert {n: example[n] for n in SETTINGS} == {n: FIELDS[n].default for n in SETTINGS}
    cfg = load_config(_write(tmp_path, _docstring_yaml()))  # the example itself is a valid config
    assert set(cfg.task_names) == {*SHORTHAND_TASKS, "breast", "chest"}


def test_packaged_and_host_settings_are_exactly_the_settings() -> None:
    """Every setting is either carried by the Bento or left to the host running it, by decision."""
    assert len(set(PACKAGED_SETTINGS)) == len(PACKAGED_SETTINGS) and len(set(HOST_SETTINGS)) == len(HOST_SETTINGS)
    assert not set(PACKAGED_SETTINGS) & set(HOST_SETTINGS)
    assert {*PACKAGED_SETTINGS, *HOST_SETTINGS} == set(SETTINGS)


# --------------------------------------------------------------------------- tasks and unknown keys


@pytest.mark.parametrize(("text", "message"), [
    ("max_file_mbb: 30\n",
     "max_file_mbb: unknown setting (did you mean 'max_file_mb'?); extra tasks go under 'tasks:'"),
    ("syslog_host: logs.example\n", "syslog_host: unknown setting; extra tasks go under 'tasks:'"),
    ("breast: b\n", "breast: unknown setting; extra tasks go under 'tasks:'"),
    ("skn: a\ntop_k: 0\n", "skn: unknown setting (did you mean 'skin'?); extra tasks go under 'tasks:'; "
                           "top_k: Input should be greater than or equal to 1 (got 0)"),
    ("skin: a\ntasks: {skin: b}\n", "skin: given twice, at the top level and under 'tasks:'"),
    ("source: bento\n", "source: unknown setting"),  # load_config's to say, not the file's
])
def test_unknown_top_level_key_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    f = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value).startswith(f"serving config {f}: {message}")
    assert len(str(info.value).splitlines()) == 1


def test_config_precedence_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tasks: and the shorthands; environment over file over defaults, MEDZOO_SERVE_<TASK> adding a task;
    each mistake refused in one line."""
    f = _write(tmp_path, "tasks: {breast: b, chest: null, organ: o}\nskin: a\ntop_k: 5\nmax_file_mb: 2\n"
                         "ensemble: {members: [m1, m2], arch: resnet18}\nbody_timeout_s: 3\n"
                         "max_request_megapixels: 100\n")
    for key, value in {"MEDZOO_SERVE_SKIN": "from-env", "MEDZOO_SERVE_BLOOD": "added-by-env", "MEDZOO_TOP_K": "4",
                       "MEDZOO_ENSEMBLE_ARCH": "resnet50", "MEDZOO_MAX_IMAGE_MEGAPIXELS": "16"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(f)
    assert cfg.tasks == {"skin": "from-env", "organ": "o", "pathology": None, "breast": "b", "chest": None,
                         "blood": "added-by-env"}
    assert (cfg.top_k, cfg.ensemble_members, cfg.ensemble_arch) == (4, ("m1", "m2"), "resnet50")
    limits = cfg.limits
    assert (limits.max_file_bytes, limits.body_timeout_s) == (2 * 2**20, 3.0)
    assert (limits.max_image_pixels, limits.max_request_pixels) == (16_000_000, 100_000_000)
    assert (cfg.request_timeout_s, cfg.decode_threads) == (60, 2)  # defaults
    for key in ("MEDZOO_SERVE_SKIN", "MEDZOO_SERVE_BLOOD", "MEDZOO_TOP_K", "MEDZOO_ENSEMBLE_ARCH",
                "MEDZOO_MAX_IMAGE_MEGAPIXELS"):
        monkeypatch.delenv(key)
    bad_cases = {"tasks: {models: x}\n": "cannot be a task name", "top_k: 0\n": "top_k", "skin: [1, 2]\n": "skin",
                 "tasks: {Bad-Name: x}\n": "Bad-Name", "max_batch_size: 1\n": "max_batch_size", "- a\n": "mapping",
                 "body_timeout_s: 0\n": "body_timeout_s", "tasks: {inference: x}\n": "cannot be a task name",
                 "ensemble: {memebrs: [a]}\n": "ensemble.memebrs", "tasks: [a]\n": "tasks",
                 "decode_queue_s: 60\n": "decode_queue_s"}
    for bad, word in bad_cases.items():
        f.write_text(bad)
        with pytest.raises(ConfigError, match=word) as info:
            load_config(f)
        assert "errors.pydantic.dev" not in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_bento_keeps_its_tasks_and_settings_under_a_host_config(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a Bento: its manifest, then the host's file (task by task), then the environment."""
    bento = tmp_path / "model"
    bento.mkdir()
    (bento / "serving.json").write_text(json.dumps({
        "tasks": {"skin": "bundles/s", "organ": None, "pathology": None, "breast": "bundles/b"},
        "ensemble": [], "ensemble_arch": "simplecnn", "settings": {"top_k": 2, "refuse_ood": True},
    }))
    monkeypatch.setattr(serving.config, "bento_model_dir", lambda: bento)
    monkeypatch.setenv("MEDZOO_SERVE_SOURCE", "bento")
    monkeypatch.setenv("MEDZOO_TOP_K", "7")
    cfg = load_config(_write(tmp_path, "tasks: {chest: c}\norgan: o\napi_workers: 4\n"))
    assert cfg.tasks == {"skin": str(bento / "bundles/s"), "organ": "o", "pathology": None,
                         "breast": str(bento / "bundles/b"), "chest": "c"}
    assert (cfg.top_k, cfg.refuse_ood, cfg.api_workers, cfg.source) == (7, True, 4, "bento")


def test_zoo_serve_reports_a_config_mistake_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zoo.cli import main

    f = _write(tmp_path, "max_file_mbb: 30\n")
    assert main(["serve", "--config", str(f), "--no-build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"zoo: error: serving config {f}: max_file_mbb: unknown setting (did you mean 'max_file_mb'?); "
                   "extra tasks go under 'tasks:'")
