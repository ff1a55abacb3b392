"""Package list for setuptools: the folders service/ and tiering/ install as ``kvtier.service`` and
``kvtier.tiering`` (``kvtier`` is a namespace package), so generic names like ``service`` never collide
with a user's own top-level packages. Everything else about the project lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = ("service", "tiering")

setup(
    package_dir={f"kvtier.{root}": root for root in ROOTS},
    packages=[f"kvtier.{name}" for name in find_packages(include=[f"{r}*" for r in ROOTS])],
)
