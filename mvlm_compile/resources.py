"""Where the recipes, the target profiles and the PEG plugin's sources are.

They live at the top of the repository (recipes/, plugins/peg/); a wheel carries copies in
mvlm_compile/_data/ (setup.py), so that a normal `pip install` works where the source tree is not.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_data"
_SOURCE_TREE = Path(__file__).resolve().parent.parent


def data_path(relative: str) -> Path:
    """`relative` (e.g. "recipes", "plugins/peg") in the installed package, else in the source tree."""
    packaged = _PACKAGED / relative
    return packaged if packaged.exists() else _SOURCE_TREE / relative


RECIPES_DIR = data_path("recipes")
PEG_DIR = data_path("plugins/peg")
