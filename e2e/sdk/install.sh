#!/usr/bin/env bash
# Installs the official SDKs the tests use as real clients (e2e/sdk/requirements.txt, from PyPI)
# into a virtualenv cached per requirements under ~/.cache/tollgate/sdk/<digest>/ (override with
# TOLLGATE_SDK_CACHE), linked at target/sdk-venv where the tests look for it. Idempotent: a
# second run with the same requirements only checks the link.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
requirements=e2e/sdk/requirements.txt
digest=$( (python3 --version; cat "$requirements") | sha256sum | cut -c1-16)
cache=${TOLLGATE_SDK_CACHE:-$HOME/.cache/tollgate/sdk}/$digest
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
mkdir -p target
ln -sfn "$cache/venv" target/sdk-venv
echo "$cache/venv"
