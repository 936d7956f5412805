#!/usr/bin/env bash
# Create ./.venv and install diffexport into it (editable), torch pinned by constraints.txt.
#   ./setup.sh          runtime + Triton extra
#   ./setup.sh --dev    also the test tools
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
extras="triton"
[ "${1:-}" = "--dev" ] && extras="dev,triton"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
