"""The errors a user can act on, in one place, importable without torch.

Every error here is a :class:`UserError`: the CLI prints its message as one line on stderr and
exits 2, the service maps it to a 4xx/503 with the message, and the Python API raises it as is.
Messages say what is wrong and what to do; where a name was mistyped they add "did you mean …"
(:func:`did_you_mean`). Pydantic validation errors are turned into one line per mistake by
:func:`describe_validation_error` instead of pydantic's multi-line text with its URLs.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """An error caused by what the user gave (a name, a file, a setting), not by a bug."""


class DataUnavailableError(UserError, RuntimeError):
    """The data is not on disk and cannot be downloaded; the message is one line for the user."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights could not be found locally nor downloaded (message is one line)."""


class BundleError(UserError, RuntimeError):
    """A bundle that is missing, incomplete, invalid or altered; the message says which."""


class ModelFileError(UserError, RuntimeError):
    """An exported file that is missing, truncated, tampered with or not a medzoo export."""


class UsageError(UserError, ValueError):
    """An argument, option or input path that cannot be used as given (a value out of range, options
    that do not go together, a folder that does not exist, a run already in progress)."""


class RecipeError(UserError, ValueError):
    """A recipe that does not exist or does not validate."""


class ConfigError(UserError, ValueError):
    """A serving configuration that cannot be used; the message says what to change."""


class ExportError(UserError, RuntimeError):
    """A model that could not be exported (the message says which step failed)."""


class ParityError(UserError, RuntimeError):
    """An exported file whose outputs (or metadata) differ from the PyTorch model's."""


class TrainingError(UserError, RuntimeError):
    """A training run that cannot produce a model (diverged, no epoch run); the message says why."""


class EnsembleError(UserError, ValueError):
    """Ensemble members that cannot be combined, or too few of them."""


class ExplainError(UserError, ValueError):
    """A model that cannot be explained as asked (a Grad-CAM layer that does not exist, a target
    class the model does not have); the message says why."""


class UnknownNameError(UserError, ValueError):
    """A dataset, architecture, bundle, task or recipe name that does not exist."""


class ImageError(UserError, ValueError):
    """An image that cannot be used; the message says why, for the user.

    ``kind`` classifies the refusal for callers that map it (the service's HTTP status):
    ``"empty"``, ``"unsupported"`` (not an image, a codec or mode that cannot be decoded),
    ``"too_large"`` (over the pixel or byte limits, decompression bombs) or ``"corrupt"``
    (truncated or damaged data, or a decodable image with nothing usable in it).
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'x' or 'y'?"`` for the closest choices, or ``""`` when none is close."""
    word = str(word)
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    # only the ones about as close as the best (not every name that shares a suffix)
    best = difflib.SequenceMatcher(None, word, close[0]).ratio()
    close = [c for c in close if difflib.SequenceMatcher(None, word, c).ratio() >= best - 0.05]
    quoted = [repr(c) for c in close]
    return "; did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"


def unknown(what: str, word: str, choices: Iterable[str], hint: str = "") -> UnknownNameError:
    """An :class:`UnknownNameError` for ``word``: suggestion when one is close, else ``hint``."""
    choices = list(choices)
    suggestion = did_you_mean(word, choices)
    tail = suggestion or (f"; {hint}" if hint else "")
    return UnknownNameError(f"unknown {what} {word!r}{tail}")


def _loc(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def _field_names(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) pydantic model at ``loc[:-1]``, for suggestions."""
    fields = getattr(model, "model_fields", None)
    for part in loc[:-1]:
        info = (fields or {}).get(part)
        sub = getattr(info, "annotation", None) if info is not None else None
        fields = getattr(sub, "model_fields", None)
    return list(fields or {})


def describe_validation_error(err: Any, model: Any = None, prefix: str = "") -> str:
    """One line per mistake of a pydantic ``ValidationError`` (location, what is wrong).

    An unknown key gets "did you mean …" from the fields of ``model`` at that place.
    """
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e.get("loc", ()))
        where = _loc(loc) or "(top level)"
        if e.get("type") == "extra_forbidden" and loc:
            names = _field_names(model, loc) if model is not None else []
            hint = did_you_mean(str(loc[-1]), names)
            lines.append(f"{prefix}{where}: unknown field{hint}")
            continue
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"{prefix}{where}: {msg}{shown}")
    return "\n".join(lines)


__all__ = ["BundleError", "ConfigError", "DataUnavailableError", "EnsembleError", "ExplainError", "ExportError",
           "ImageError", "ModelFileError", "ParityError", "RecipeError", "TrainingError", "UnknownNameError",
           "UsageError", "UserError", "WeightsUnavailableError", "describe_validation_error", "did_you_mean", "unknown"]
