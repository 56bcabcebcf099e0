#!/usr/bin/env bash
# System packages meshrun needs to install: py-libp2p pins fastecdsa, which has no
# Linux wheel and compiles against GMP.
set -euo pipefail
missing=()
for pkg in build-essential libgmp-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "meshrun needs a C compiler and the GMP headers (Debian: build-essential libgmp-dev);" >&2
  echo "install them with your system's package manager, then run this again." >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing system packages: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
