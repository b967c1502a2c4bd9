"""Packaging hook: a wheel carries the recipes, the target profiles and the PEG plugin's sources.

They stay at the top of the repository (recipes/, plugins/peg/); a non-editable build copies them
into mvlm_compile/_data/, where mvlm_compile.resources finds them after `pip install`.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = {"recipes": "recipes", "plugins/peg": "plugins/peg"}


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the source tree
        for source, target in DATA.items():
            destination = Path(self.build_lib) / "mvlm_compile" / "_data" / target
            shutil.rmtree(destination, ignore_errors=True)
            shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("build", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithData})
