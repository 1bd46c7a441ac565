#!/usr/bin/env bash
# Builds the e2e node from upstream Go modules pinned in this repository, through the Go module
# proxy: kubelet, kube-scheduler and kube-proxy (the control plane's wrapper module,
# ../controlplane/kube), kube-router (NetworkPolicy enforcement), a minimal CoreDNS, helm, and
# the pause program of the sandbox image. Caches the binaries under
# ~/.cache/tollgate/node/<versions>/bin (outside the clone, so a fresh clone on the same machine
# reuses them) and prints that directory as its last line. A second run with the binaries present
# does nothing; concurrent runs wait for each other; a failed run resumes where it stopped.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kube_mod="$here/../controlplane/kube"
pinned() { # MODULE-DIR MODULE: the version go.mod requires
  awk -v m="$2" '($1 == "require" && $2 == m) || $1 == m {print ($1 == "require") ? $3 : $2; exit}' "$1/go.mod"
}
kube=$(pinned "$kube_mod" k8s.io/kubernetes)
router=$(pinned "$here/kube-router" github.com/cloudnativelabs/kube-router/v2)
coredns=$(pinned "$here/coredns" github.com/coredns/coredns)
helm=$(pinned "$here/helm" helm.sh/helm/v4)
for v in kube router coredns helm; do
  [[ -n ${!v} ]] || { echo "build.sh: cannot read the pinned $v version from $here" >&2; exit 1; }
done
out="${TOLLGATE_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/node}/kube-$kube-router-$router-coredns-$coredns-helm-$helm"
bin="$out/bin"
mkdir -p "$bin"
exec 9>"$out/.lock"
flock 9

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
export GOCACHE="$out/go-cache" GOMODCACHE="$out/go-mod"
built=0
build() { # NAME MODULE-DIR PACKAGE [LDFLAGS]: builds bin/NAME unless it is there
  local name=$1 dir=$2 pkg=$3 ld=${4:-"-s -w"} start=$SECONDS
  [[ -x $bin/$name ]] && return 0
  echo "building $name ($pkg)" >&2
  (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$bin/$name.partial" "$pkg") >&2
  mv "$bin/$name.partial" "$bin/$name"
  echo "built $name in $((SECONDS - start))s" >&2
  built=1
}
minor=${kube#v1.}; minor=${minor%%.*}
kube_ld="-s -w -X k8s.io/component-base/version.gitVersion=$kube"
kube_ld+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
kube_ld+=" -X k8s.io/component-base/version.gitTreeState=clean"

build pause "$here/pause" .
build kubelet "$kube_mod" k8s.io/kubernetes/cmd/kubelet "$kube_ld"
build kube-scheduler "$kube_mod" k8s.io/kubernetes/cmd/kube-scheduler "$kube_ld"
build kube-proxy "$kube_mod" k8s.io/kubernetes/cmd/kube-proxy "$kube_ld"
build kube-router "$here/kube-router" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router \
  "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$router"
build coredns "$here/coredns" .
build helm "$here/helm" helm.sh/helm/v4/cmd/helm \
  "-s -w -X helm.sh/helm/v4/internal/version.version=$helm"

# The Go caches (several GB) are only read while building: the binaries are the cache.
if (( built )); then
  go clean -modcache >&2 || true
  rm -rf "$GOCACHE" "$GOMODCACHE"
fi
echo "$bin"
