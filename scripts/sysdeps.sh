#!/usr/bin/env bash
# System packages meshrun needs to install: py-libp2p pins fastecdsa, which has no
# Linux wheel and compiles against GMP.
# The network testbed (node/dev/testnet.py, tests/testbed) also needs iproute2,
# nftables (partitions, loss) and iptables (its NFQUEUE target delays packets: the
# kernel may lack nftables' own `queue`); without them those tests are skipped.
# The explorer's browser tests drive Debian's chromium through chromium-driver
# (installed as root with apt only; without them those tests are skipped).
set -euo pipefail
required=(build-essential libgmp-dev)
testbed=(iproute2 nftables iptables chromium chromium-driver)
missing=()
missing_testbed=()
for pkg in "${required[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
for pkg in "${testbed[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing_testbed+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && [ ${#missing_testbed[@]} -eq 0 ] && exit 0
if [ ${#missing[@]} -eq 0 ] && { [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; }; then
  # Only the testbed's tools are missing, and the testbed runs only as root: meshrun
  # itself builds, and those tests skip with the reason.
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "meshrun needs a C compiler and the GMP headers (Debian: build-essential libgmp-dev);" >&2
  echo "install them with your system's package manager, then run this again." >&2
  echo "(the network testbed also uses iproute2, nftables and iptables; the browser" >&2
  echo "tests use chromium and chromium-driver)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
all=("${missing[@]}" "${missing_testbed[@]}")
echo "installing system packages: ${all[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${all[@]}"
