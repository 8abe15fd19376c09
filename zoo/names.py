"""Dataset and task names, without torch or medmnist: what the store, the CLI and the service
need to resolve ``skin``, ``derma``, ``DermaMNIST`` or an image folder to one canonical name.

Canonical names: a MedMNIST 2D flag (``dermamnist``), ``mnist``, a report's image-folder dataset
(``isic2019``, ``binaryskin``) or ``folder:<absolute path>``.
"""

from __future__ import annotations

from pathlib import Path

from zoo.errors import unknown

# The 2D flags of medmnist 3.x (tests check this list against ``medmnist.INFO``; kept here so
# that resolving a name never imports medmnist, which imports torch).
MEDMNIST_2D: tuple[str, ...] = (
    "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
    "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
)

# Service task → the MedMNIST flag it serves.
TASKS: dict[str, str] = {"skin": "dermamnist", "organ": "organamnist", "pathology": "pathmnist"}

# Short names used by the reports and the service's task names.
ALIASES: dict[str, str] = {
    "skin": "dermamnist",
    "derma": "dermamnist",
    "organ": "organamnist",
    "organa": "organamnist",
    "organc": "organcmnist",
    "organs": "organsmnist",
    "pathology": "pathmnist",
    "path": "pathmnist",
    "breast": "breastmnist",
    "blood": "bloodmnist",
    "chest": "chestmnist",
    "oct": "octmnist",
    "pneumonia": "pneumoniamnist",
    "retina": "retinamnist",
    "tissue": "tissuemnist",
}

# Datasets of the reports that are user image folders (not downloadable): name → where from.
FOLDER_DATASETS: dict[str, str] = {
    "isic2019": "the ISIC 2019 training images (challenge.isic-archive.com), one sub-folder per class",
    "binaryskin": "a benign/malignant skin lesion image folder (report 004), one sub-folder per class",
}


def medmnist_flag(name: str) -> str | None:
    """Flag for an alias or flag (``derma``, ``DermaMNIST``, ``dermamnist``); None if unknown."""
    key = name.lower()
    flag = ALIASES.get(key, key if key.endswith("mnist") else key + "mnist")
    return flag if flag in MEDMNIST_2D else None


def known_names() -> list[str]:
    """Every dataset name a user may type (flags, aliases, mnist, folder datasets)."""
    return sorted({*MEDMNIST_2D, *ALIASES, "mnist", *FOLDER_DATASETS})


def resolve_name(name: str) -> str:
    """Canonical dataset name: a MedMNIST flag, ``mnist``, a folder dataset or ``folder:<abs path>``."""
    if name.startswith("folder:"):
        return "folder:" + str(Path(name[7:]).expanduser().resolve())
    if name.lower() in ("mnist", *FOLDER_DATASETS):
        return name.lower()
    flag = medmnist_flag(name)
    if flag is not None:
        return flag
    if Path(name).expanduser().is_dir():
        return "folder:" + str(Path(name).expanduser().resolve())
    raise unknown("dataset", name, known_names(),
                  hint=f"use a MedMNIST name ({', '.join(sorted(ALIASES))}, …), 'mnist', or an image folder")


def short_name(canonical: str) -> str:
    """A short label for ids and tables: the flag, or the folder's last path part."""
    return canonical.split("/")[-1].replace("folder:", "")


__all__ = ["ALIASES", "FOLDER_DATASETS", "MEDMNIST_2D", "TASKS", "known_names", "medmnist_flag", "resolve_name",
           "short_name"]
