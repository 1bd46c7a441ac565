#!/usr/bin/env bash
# Builds Prometheus and promtool from the module pinned in go.mod (through the Go module proxy),
# cached under ~/.cache/tollgate/prometheus/<version>/bin (outside the clone), and prints that
# directory as its last line. promtool checks and unit-tests the chart's alert rules; Prometheus
# scrapes an e2e run so that every dashboard query is evaluated against real data. A second run
# does nothing; concurrent runs wait for each other.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "require" && $2 == "github.com/prometheus/prometheus" {print $3; exit}' "$here/go.mod")
[[ -n $version ]] || { echo "build.sh: cannot read the pinned Prometheus version" >&2; exit 1; }
out="${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/prometheus/$version"
bin="$out/bin"
mkdir -p "$bin"
exec 9>"$out/.lock"
flock 9
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
export GOCACHE="$out/go-cache" GOMODCACHE="$out/go-mod"
built=0
for name in promtool prometheus; do
  [[ -x $bin/$name ]] && continue
  start=$SECONDS
  echo "building $name $version" >&2
  (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$bin/$name.partial" \
    "github.com/prometheus/prometheus/cmd/$name") >&2
  mv "$bin/$name.partial" "$bin/$name"
  echo "built $name in $((SECONDS - start))s" >&2
  built=1
done
if (( built )); then
  go clean -modcache >&2 || true
  rm -rf "$GOCACHE" "$GOMODCACHE"
fi
echo "$bin"
