#!/usr/bin/env bash
# Builds the local test cluster's control-plane programs into BIN_DIR (default .cache/cluster/bin):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kube-proxy, from the two Go
# modules beside this script (their go.mod/go.sum files are the whole recipe: versions pinned there).
#
#   build.sh [BIN_DIR]          build, unless the stamp for the current go.mod/go.sum files and
#                               build flags is there
#   build.sh --check [BIN_DIR]  exit 0 when built and current, 1 otherwise (builds nothing)
#
# The Go module and build caches are Go's own (`go env GOMODCACHE GOCACHE`, shared by every clone),
# and the built programs are kept per recipe key in ~/.cache/splitserve/cluster-bin/<key>/: a fresh
# clone on a machine that built them once copies them in seconds. The toolchain is the local one
# (GOTOOLCHAIN=local: never a download). Static binaries (CGO_ENABLED=0, as upstream
# releases them), -trimpath, stripped. A cold build is about 26 CPU-minutes (27 min wall on 2
# shared cores, see docs/testing.md); a second call with nothing changed returns at once.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

check_only=0
if [[ "${1:-}" == "--check" ]]; then
    check_only=1
    shift
fi
BIN="${1:-$ROOT/.cache/cluster/bin}"
# Absolute: the builds below run from the module directories (`make test` passes a relative path).
[[ "$BIN" == /* ]] || BIN="$PWD/$BIN"
PROGRAMS=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy)

# The release version stamped into the binaries (what `kubectl version` and helm's kubeVersion
# checks see), read from the one place it is pinned.
k8s_version="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$HERE/kubernetes/go.mod")"
[[ "$k8s_version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || {
    echo "cluster-bins: cannot read the k8s.io/kubernetes version from $HERE/kubernetes/go.mod" >&2
    exit 1
}
major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# -modcacherw: a module cache `rm -rf` (make clean) can remove without chmod.
goflags="-mod=readonly -buildvcs=false -modcacherw -trimpath"
cgo=0

# One key for everything that decides the binaries' content: the module files and the recipe.
key="$(cat "$HERE"/etcd/go.mod "$HERE"/etcd/go.sum "$HERE"/kubernetes/go.mod \
    "$HERE"/kubernetes/go.sum <(echo "$ldflags $goflags $cgo") | sha256sum | cut -c1-16)"
stamp="$BIN/.built-$key"

built() {
    [[ -f "$stamp" ]] || return 1
    local p
    for p in "${PROGRAMS[@]}"; do
        [[ -x "$BIN/$p" ]] || return 1
    done
}

if built; then
    exit 0
fi
if ((check_only)); then
    exit 1
fi

# Programs built once for this key on this machine (by any clone): copy them in.
store="${SPLITSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/splitserve}/cluster-bin/$key"
install_from_store() {
    local p
    for p in "${PROGRAMS[@]}"; do
        [[ -x "$store/$p" ]] || return 1
    done
    mkdir -p "$BIN"
    for p in "${PROGRAMS[@]}"; do
        cp -f "$store/$p" "$BIN/$p.tmp" && mv -f "$BIN/$p.tmp" "$BIN/$p"
    done
    rm -f "$BIN"/.built-*
    touch "$stamp"
    echo "cluster-bins: copied ${PROGRAMS[*]} from $store"
}
if install_from_store; then
    exit 0
fi

command -v go >/dev/null || {
    echo "cluster-bins: no Go toolchain on PATH (needed to build the control plane)" >&2
    exit 1
}

export GOTOOLCHAIN=local CGO_ENABLED=$cgo GOFLAGS="$goflags"

mkdir -p "$BIN"
work="$(mktemp -d "$BIN/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

start=$SECONDS
echo "cluster-bins: building etcd ($(go version | cut -d' ' -f3), caches under $(go env GOCACHE))"
(cd "$HERE/etcd" && go build -ldflags "-s -w" -o "$work/etcd" go.etcd.io/etcd/server/v3)
echo "cluster-bins: building kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy" \
    "$k8s_version ($((SECONDS - start)) s so far)"
(cd "$HERE/kubernetes" && go build -ldflags "$ldflags" -o "$work/" tool)

mkdir -p "$store"
for p in "${PROGRAMS[@]}"; do
    mv -f "$work/$p" "$store/$p"
done
echo "cluster-bins: built ${PROGRAMS[*]} into $store in $((SECONDS - start)) s"
install_from_store
