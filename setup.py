"""Package layout only (metadata lives in pyproject.toml).

The design card's top-level folders install under one unambiguous import name:
schemas/ -> chatreid.schemas, services/ -> chatreid.services, ray_jobs/ -> chatreid.ray_jobs.
"""

from setuptools import find_packages, setup

MAPPED = {
    "chatreid.schemas": "schemas",
    "chatreid.services": "services",
    "chatreid.ray_jobs": "ray_jobs",
}

packages = find_packages(include=["chatreid", "chatreid.*"])
package_dir = {"chatreid": "chatreid"}
for name, folder in MAPPED.items():
    package_dir[name] = folder
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages, package_dir=package_dir)
