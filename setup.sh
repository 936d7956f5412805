#!/usr/bin/env bash
# Create ./.venv and install diffexport into it (editable), torch pinned by constraints.txt.
#   ./setup.sh          runtime + Triton extra
#   ./setup.sh --dev    also the test tools and the Debian packages the C++ runner's tests build
#                       against (nlohmann-json3-dev, libssl-dev, libcli11-dev: apt-get, as root or via sudo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
extras="triton"
[ "${1:-}" = "--dev" ] && extras="dev,triton"
if [ "${1:-}" = "--dev" ] && command -v dpkg >/dev/null; then
  cpp_packages="nlohmann-json3-dev libssl-dev libcli11-dev"  # keep in step with diffexport/deploy/cpp.py PACKAGES
  missing=""
  for p in $cpp_packages; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup.sh: installing Debian packages for the C++ runner:$missing"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
