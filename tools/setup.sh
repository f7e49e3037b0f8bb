#!/bin/bash
# Install what lstore, its tests and its benchmarks need on a fresh Debian 12 machine, then
# install the repository in editable mode with the test extras. Run as root; safe to rerun.
# PYTHON selects the interpreter to install into (default: python3 on PATH).
set -euo pipefail
trap 'echo "tools/setup.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

packages=(
    docker-registry skopeo umoci containerd runc busybox-static debootstrap
    iptables nftables iproute2 curl ca-certificates tar util-linux tini
)

if [[ $EUID -ne 0 ]]; then
    echo "tools/setup.sh: must run as root (it installs Debian packages)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes

# The busybox test image is multi-platform and takes its arm64 binary from the arm64 .deb,
# which apt can download only once the architecture is enabled.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
fi

if ! "$python" -m pip --version >/dev/null 2>&1; then
    packages+=(python3-pip)
fi

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# Debian's own python3 is marked externally managed (PEP 668); the machine is dedicated to
# lstore, so installing into it is intended.
PIP_BREAK_SYSTEM_PACKAGES=1 "$python" -m pip install -q --root-user-action=ignore -e "${repo_dir}[test]"
# Byte-compile ahead, because an environment with PYTHONDONTWRITEBYTECODE set would otherwise
# compile lstore's modules again at every command start.
"$python" -m compileall -q "$repo_dir/lstore" "$repo_dir/store" "$repo_dir/runner" \
    "$repo_dir/tools" "$repo_dir/bench" >/dev/null
echo "tools/setup.sh: system packages and lstore (editable) installed"
