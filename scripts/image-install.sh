#!/bin/sh
# The one list of steps that makes splitserve's image environment, a venv at PREFIX built from the
# source tree SRC. The Dockerfile runs it, and so does the local cluster's image builder
# (cluster/image.py), so what the pods run in the cluster tests is what the image holds.
#
#   image-install.sh PREFIX SRC deps      venv, pinned pip, torch (pinned exactly), then every
#                                          dependency the package and its extras declare
#   image-install.sh PREFIX SRC package   the splitserve package itself from SRC: a plain wheel
#                                          install, no dependencies resolved, never editable;
#                                          then its C++ CPU kernels, compiled into the package
#                                          (needs a C++ compiler: the Dockerfile's build stage
#                                          installs g++), so pods never compile at start
#   image-install.sh PREFIX SRC kernels   only the C++ CPU kernel prebuild (part of package)
#   image-install.sh PREFIX SRC all       deps and package (the default)
#
# `deps` reads only SRC/pyproject.toml, so the Dockerfile can run it before it copies the sources
# (a source edit then reinstalls nothing but the package, in seconds).
# PYTHON names the interpreter the venv is made from (default: python3).
set -eu

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 PREFIX SRC [deps|package|all]" >&2
    exit 2
fi
PREFIX=$1
SRC=$2
STEP=${3:-all}
PYTHON=${PYTHON:-python3}
# The source tree has an `operator` folder: the working directory must never shadow the stdlib.
export PYTHONSAFEPATH=1

# Extras the pods need: nixl moves KV blocks between prefill and decode pods; triton holds the GPU
# kernels (unused on CPU nodes, where the engines take the torch / C++ path, but it is the same
# image on GPU nodes, and it costs no CUDA download of its own).
EXTRAS=triton,nixl
# One pip for every build, so the resolver is the same in the Dockerfile and in the cluster.
PIP_VERSION=26.3

install() {
    "$PREFIX/bin/python" -m pip install "$@"
}

deps() {
    if [ ! -x "$PREFIX/bin/python" ]; then
        "$PYTHON" -m venv "$PREFIX"
    fi
    install "pip==$PIP_VERSION"
    reqs=$(mktemp)
    pins=$(mktemp)
    trap 'rm -f "$reqs" "$pins"' EXIT
    # The requirements come from pyproject.toml alone (tomllib: Python >= 3.11). torch must be
    # pinned exactly there; it goes in first and alone, so nothing else can pick another torch.
    "$PREFIX/bin/python" -I - "$SRC/pyproject.toml" "$EXTRAS" >"$reqs" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
build = project["build-system"]["requires"]
deps = project["project"]["dependencies"]
extras = project["project"].get("optional-dependencies", {})
for name in sys.argv[2].split(","):
    deps += extras[name]
torch = [d for d in deps if d.replace(" ", "").startswith("torch==")]
if len(torch) != 1:
    sys.exit("pyproject.toml must pin torch exactly (torch==X.Y.Z)")
# setuptools/wheel: the package step builds without isolation, and torch.utils.cpp_extension
# (the engines' C++ CPU kernels) imports setuptools at run time.
print("\n".join([torch[0], *build, *deps]))
EOF
    head -n 1 "$reqs" >"$pins"
    install -r "$pins"
    install --constraint "$pins" -r "$reqs"
}

package() {
    # --force-reinstall: the version number does not change between source edits.
    "$PREFIX/bin/pip" install --no-deps --no-build-isolation --force-reinstall "$SRC"
    "$PREFIX/bin/pip" check
    kernels
}

kernels() {
    # Into site-packages/splitserve/kernels/cpu/prebuilt/, named by a digest of the sources and
    # torch; kernels/cpu/__init__.py loads it before it would try to compile. An unchanged
    # build is kept (pip's reinstall leaves the folder, which its RECORD does not list). Run
    # from / so the source tree's `operator` folder can never shadow anything.
    (cd / && "$PREFIX/bin/python" -P -c '
from splitserve.kernels import cpu
print("C++ CPU kernels prebuilt:", cpu.prebuild())
')
}

case $STEP in
    deps) deps ;;
    package) package ;;
    kernels) kernels ;;
    all)
        deps
        package
        ;;
    *)
        echo "unknown step: $STEP (deps, package, kernels or all)" >&2
        exit 2
        ;;
esac
