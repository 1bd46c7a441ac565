#!/usr/bin/env bash
# Builds kstatus (main.go: the health computation Flux uses, sigs.k8s.io/cli-utils pinned in
# go.mod) through the Go module proxy, cached under ~/.cache/tollgate/kstatus/<version>/bin
# (outside the clone), and prints that directory as its last line. A second run does nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "sigs.k8s.io/cli-utils" {print $2; exit}' "$here/go.mod")
[[ -n $version ]] || { echo "build.sh: cannot read the pinned cli-utils version" >&2; exit 1; }
out="${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/kstatus/cli-utils-$version-$(sha256sum "$here/main.go" | cut -c1-12)"
bin="$out/bin"
mkdir -p "$bin"
exec 9>"$out/.lock"
flock 9
if [[ ! -x $bin/kstatus ]]; then
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
  export GOCACHE="$out/go-cache" GOMODCACHE="$out/go-mod"
  start=$SECONDS
  (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$bin/kstatus.partial" .) >&2
  mv "$bin/kstatus.partial" "$bin/kstatus"
  echo "built kstatus in $((SECONDS - start))s" >&2
  go clean -modcache >&2 || true
  rm -rf "$GOCACHE" "$GOMODCACHE"
fi
echo "$bin"
