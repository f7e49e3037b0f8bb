#!/bin/bash
# Install what the suite needs on a fresh Debian 12 machine (as root), then run it.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k pull`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash tools/setup.sh

# pytest exits 5 when it collects nothing, and that counts as a failure here.
exec python3 -m pytest -p no:cacheprovider "$@"
