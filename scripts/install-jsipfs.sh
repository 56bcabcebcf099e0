#!/usr/bin/env bash
# Install the real IPFS daemon the tests run against (js-ipfs 0.66.1 from npm; no
# Kubo binary can be installed on these machines, see tests/fixtures/jsipfs/).
#
# node_modules (~300 MB, ~2 min cold) is kept in a cache keyed on the hash of
# package.json + package-lock.json, so a second run on the same machine only
# re-links it; changing the pinned overrides or the lockfile installs afresh.
# `npm install` (not `npm ci`): the overrides only resolve that way (see the
# fixture's README.md). Re-running is cheap and safe.
set -euo pipefail
cd "$(dirname "$0")/.."
fixture="tests/fixtures/jsipfs"
cache_root="${MESHRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshrun}/jsipfs"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Node.js and npm (needed for the test IPFS daemon)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm
  else
    echo "the IPFS daemon tests need Node.js >= 18 and npm; install them and run this again" >&2
    exit 1
  fi
fi

key="$(cat "$fixture/package.json" "$fixture/package-lock.json" | sha256sum | cut -c1-16)"
target="$cache_root/$key"
if [ ! -f "$target/.complete" ]; then
  mkdir -p "$cache_root"
  exec 9>"$cache_root/.lock"
  flock 9
  if [ ! -f "$target/.complete" ]; then
    echo "installing js-ipfs into $target (about 2 minutes the first time)" >&2
    rm -rf "$cache_root"/.install-*  # left by an interrupted run; we hold the lock
    work="$(mktemp -d "$cache_root/.install-XXXXXX")"
    cp "$fixture/package.json" "$fixture/package-lock.json" "$work/"
    (cd "$work" && npm install --no-audit --no-fund --loglevel=error >&2)
    test -f "$work/node_modules/ipfs/src/cli.js"
    rm -rf "$target"
    mv "$work" "$target"
    touch "$target/.complete"
  fi
  flock -u 9
fi
ln -sfn "$target/node_modules" "$fixture/node_modules"
echo "js-ipfs ready: $fixture/node_modules -> $target/node_modules" >&2
