"""Build hook (everything else is in pyproject.toml): ship the Triton kernels inside the package.

The kernels live in the repository's top-level ``kernels/`` folder, beside the book, and are imported as
``effref.kernels``; that folder has no ``__init__.py``, so nothing of ours answers ``import kernels`` (Hugging
Face's package of that name does). A source checkout finds them through ``effref/kernels/__init__.py``; a
wheel needs them copied beside that file, with the measured GPU results the chapters plot.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_FILES = ("*.py", "results/*.json")


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads kernels/ in place
            return
        target = Path(self.build_lib, "effref", "kernels")
        for pattern in KERNEL_FILES:
            for source in sorted(Path("kernels").glob(pattern)):
                destination = target / source.relative_to("kernels")
                self.mkpath(str(destination.parent))
                self.copy_file(str(source), str(destination))


setup(cmdclass={"build_py": BuildPyWithKernels})
