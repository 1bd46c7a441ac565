#!/usr/bin/env bash
# Builds the e2e control plane (etcd, kube-apiserver, kube-controller-manager) from the upstream
# Go modules pinned in kube/go.mod and etcd/go.mod, through the Go module proxy, and caches the
# binaries under ~/.cache/tollgate/controlplane/<versions>/bin (outside the clone, so a fresh clone
# on the same machine reuses them). Prints that directory as its last line.
# A second run with the binaries present does nothing. Concurrent runs wait for each other.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
kube_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/kube/go.mod")
etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/etcd/go.mod")
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
  echo "build.sh: cannot read the pinned versions from $here/kube/go.mod and $here/etcd/go.mod" >&2
  exit 1
fi
out="${TOLLGATE_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/controlplane}/kube-$kube_version-etcd-$etcd_version"
bin="$out/bin"
mkdir -p "$out"

exec 9>"$out/.lock"
flock 9
if [[ -x "$bin/etcd" && -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" ]]; then
  echo "$bin"
  exit 0
fi

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
# The build and module caches are private to this build and removed once the binaries are in
# place (about 5 GB that nothing reads again: the binaries are the cache). A failed build keeps
# them, so a retry resumes.
export GOCACHE="$out/go-cache" GOMODCACHE="$out/go-mod"
minor=${kube_version#v1.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$kube_version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
start=$SECONDS
echo "building kube-apiserver and kube-controller-manager $kube_version (several minutes on a cold cache)" >&2
mkdir -p "$bin.partial"
(cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$bin.partial/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) >&2
echo "building etcd $etcd_version" >&2
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin.partial/etcd" go.etcd.io/etcd/server/v3) >&2
rm -rf "$bin"
mv "$bin.partial" "$bin"
go clean -modcache >&2
rm -rf "$GOCACHE" "$GOMODCACHE"
echo "control plane built in $((SECONDS - start))s" >&2
echo "$bin"
