"""Only the build-time mapping pyproject.toml cannot say: the top-level conf/ ships as `lra.conf`.

In the tree the configs stay at conf/ (next to lra/ and models/); in a wheel they are lra/conf/, where
lra.config finds them, so an installed lra-train composes its configs from any working directory.
Everything else about the package is in pyproject.toml.
"""
from setuptools import find_namespace_packages, find_packages, setup

CONF = ["lra.conf", *(f"lra.conf.{p}" for p in find_namespace_packages(where="conf"))]

setup(
    packages=[*find_packages(include=["lra*", "models*"]), *CONF],
    package_dir={"lra.conf": "conf"},
    package_data={p: ["*.yaml"] for p in CONF},
)
