"""setuptools hook (``[tool.setuptools.cmdclass]`` in pyproject.toml): a built wheel carries the checkout's
``recipes/`` and ``data_specs/`` (recipes, tiny tokenizer, data specs and the demo / held-out evaluation data, ~23 MB,
~6 MB compressed) as ``nvembed/_bundled/``, so that ``nvembed-train --config-name=smoke`` works from a regular
install, in any working directory. An editable install reads the checkout's folders instead (``nvembed.paths``).
"""

import os
import shutil

from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = ("recipes", "data_specs")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the checkout's own folders are used
            return
        for name in BUNDLED:
            src = os.path.join(HERE, name)
            if not os.path.isdir(src):  # e.g. building from an sdist made without them
                raise FileNotFoundError(f"{src} is missing: the wheel would have no {name}/")
            dst = os.path.join(self.build_lib, "nvembed", "_bundled", name)
            shutil.rmtree(dst, ignore_errors=True)  # files left by an earlier build must not ship
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
