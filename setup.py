"""setuptools hook (the project's metadata is in pyproject.toml): the wheel carries the example configs and
workflows and the ComfyUI node pack (its __init__.py, nodes/ and web/) inside sfgrpo_core/_shipped/, so that an
installed ``sfgrpo`` finds them from any directory (sfgrpo_core/shipped.py). A checkout reads the top-level
folders themselves."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"configs": "configs", "workflows": "workflows", "pack/__init__.py": "__init__.py", "pack/nodes": "nodes",
           "pack/web": "web"}


class BuildPyWithShippedFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, which has the folders themselves
        target = Path(self.build_lib) / "sfgrpo_core" / "_shipped"
        for name, source in SHIPPED.items():
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, destination, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules"))
            else:
                shutil.copyfile(ROOT / source, destination)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
