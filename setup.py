"""Maps the top-level folders onto the import name ``ovdlab``.

``platform/``, ``methods/`` and ``jobs/`` carry no ``__init__.py``: one there would
shadow the standard library ``platform`` module. Packaging gives them their
``ovdlab.`` names instead.
"""
from setuptools import find_namespace_packages, setup

ROOTS = {"platform": "ovdlab.platform", "methods": "ovdlab.methods", "jobs": "ovdlab.jobs"}

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir=package_dir)
