#!/usr/bin/env bash
# Everything the test suite needs before `cargo test --workspace`, so that no test installs
# anything: the Debian packages (as root, with apt-get, only those missing), the control plane
# and the node built from pinned Go modules (cached under ~/.cache/tollgate), the official SDKs
# (PyPI, cached), and Tollgate's images (a release build). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "e2e/prepare.sh: $1 is required: $2" >&2; exit 1; }; }
need cargo "install Rust with rustup (stable, with the rustfmt and clippy components)"
need go "install Go 1.26.7 or newer; the e2e control plane, node and Prometheus are built from Go modules"
need kubectl "install kubectl 1.33 or newer; the e2e tests drive the apiserver with it as users do"
need python3 "install Python 3.9 or newer; the official OpenAI and Anthropic SDKs drive the LLM proxy in the tests"

# Debian packages: flock, unshare and nsenter (util-linux) for the build caches and the e2e node's
# namespaces; PostgreSQL for the audit store's tests; containerd and runc run Tollgate's images
# (e2e/tests/images.rs) and the node's pods (e2e/tests/cluster.rs) with the CNI plugins, iptables,
# ipset (kube-router) and conntrack (kube-proxy); ldd and the CA certificates go into the images;
# python3-venv holds the SDKs; nodejs and npm the TypeScript SDK and the reference MCP server;
# valgrind counts the hot paths' instructions (perf/).
missing=()
command -v flock >/dev/null 2>&1 || missing+=(util-linux)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v containerd >/dev/null 2>&1 || missing+=(containerd)
command -v runc >/dev/null 2>&1 || missing+=(runc)
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v ipset >/dev/null 2>&1 || missing+=(ipset)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
if ((${#missing[@]})); then
  echo "== apt-get install ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== control plane (cached under ~/.cache/tollgate/controlplane)"
bash e2e/controlplane/build.sh
echo "== node: kubelet, kube-scheduler, kube-proxy, kube-router, CoreDNS, helm (cached under ~/.cache/tollgate/node)"
bash e2e/node/build.sh
echo "== kstatus, the health computation Flux uses (cached under ~/.cache/tollgate/kstatus)"
bash e2e/kstatus/build.sh >/dev/null
echo "== Prometheus and promtool, for the alert rules and the dashboard (cached under ~/.cache/tollgate/prometheus)"
bash e2e/prometheus/build.sh >/dev/null
echo "== official SDKs for the tests (PyPI; cached under ~/.cache/tollgate/sdk, linked at target/sdk-venv)"
bash e2e/sdk/install.sh
echo "== images (release binaries, daemonless; target/images)"
cargo run --locked -q -p tollgate-e2e --bin images
echo "== the instruction counter of the hot paths (a release build; perf/)"
cargo build --locked -q --release -p tollgate-perf
