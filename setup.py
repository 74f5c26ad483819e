"""Maps the repository's top-level folders onto the `splitserve` import namespace.

Everything else lives in pyproject.toml. The folders stay where the design card puts them
(operator/, services/, proto/, kernels/), yet nothing named `operator` ever lands on sys.path:
they are importable only as `splitserve.<folder>`.
"""

from pathlib import Path

from setuptools import find_packages, setup

FOLDERS = {"splitserve": "splitserve"} | {
    f"splitserve.{name}": name
    for name in ("engine", "kvtransfer", "operator", "services", "proto", "kernels", "cluster")
    # cluster/ (the local test cluster's tooling) is not copied into the image.
    if Path(name).is_dir()
}

packages: list[str] = []
for package, folder in FOLDERS.items():
    packages.append(package)
    packages.extend(f"{package}.{sub}" for sub in find_packages(folder))

setup(
    packages=packages,
    package_dir=FOLDERS,
    package_data={
        "splitserve.proto": ["*.proto"],
        "splitserve.operator": ["*.yaml"],
        "splitserve.kernels.cpu": ["*.cpp", "*.h"],
    },
)
