"""The family registry: every family module registers its class (models/base.py's `register_family`) on import;
this module imports them all and answers by name or by folder."""
from __future__ import annotations

import json
import os

from . import flux, qwen_image, sd3  # noqa: F401  (each registers itself)
from .base import FAMILIES, PIPELINE_CLASSES, Family, ModelFolderError


def family_names() -> list:
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r}: not a registered family ({', '.join(sorted(FAMILIES))}, or auto)")
    return FAMILIES[name]()


def family_of_folder(path: str) -> str:
    """The family named by a diffusers folder's model_index.json; a clear error for any other pipeline class."""
    index_path = os.path.join(path, "model_index.json")
    try:
        with open(index_path) as f:
            cls = json.load(f).get("_class_name", "")
    except OSError as exc:
        raise ModelFolderError(f"model folder '{path}': cannot read model_index.json ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"model folder '{path}': model_index.json is not valid JSON ({exc})") from exc
    if cls not in PIPELINE_CLASSES:
        raise ModelFolderError(f"model folder '{path}': model_index.json names pipeline class {cls!r}; supported: "
                               f"{', '.join(sorted(PIPELINE_CLASSES))} (model.family)")
    return PIPELINE_CLASSES[cls]


def check_model_folder(path: str, family: str) -> None:
    """The folder exists, holds the family's components and its model_index.json names that family's pipeline."""
    fam = get_family(family)
    if not os.path.isdir(path):
        raise ModelFolderError(f"model folder '{path}' does not exist (model.path)")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        found = family_of_folder(path)
        if found != family:
            raise ModelFolderError(f"model folder '{path}' holds a {FAMILIES[found].pipeline_class} "
                                   f"(model_index.json), but model.family is '{family}' ({fam.pipeline_class}); set "
                                   f"model.family={found} or auto")
    missing = [p for p in fam.required if not os.path.exists(os.path.join(path, p))]
    if missing:
        raise ModelFolderError(f"model folder '{path}' is not a diffusers {fam.pipeline_class} folder: missing "
                               f"{', '.join(missing)}")
