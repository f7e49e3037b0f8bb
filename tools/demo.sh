#!/bin/bash
# The lstore demo on a fresh Debian 12 machine, as root: install what it needs, start a
# distribution registry on loopback, build and push real images made from Debian packages,
# pull them, show their content and run them.
#
# Everything runs inside a network namespace that this script creates and deletes, so the
# host's routes and firewall stay as they were. The store lives in a temporary directory
# unless LSTORE_ROOT is set.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "${1:-}" != "--inside" ]]; then
    bash "$repo/tools/setup.sh"
    netns="lstore-demo-$$"
    ip netns add "$netns"
    trap 'ip netns delete "$netns"' EXIT
    # nsenter rather than `ip netns exec`: the latter also remounts /sys, which hides the
    # cgroup hierarchies that containers need.
    nsenter --net="/run/netns/$netns" ip link set lo up
    nsenter --net="/run/netns/$netns" bash "$0" --inside
    exit
fi

python="$(python3 -c 'import sys; print(sys.executable)')"
work="$(mktemp -d /tmp/lstore-demo.XXXXXX)"
export LSTORE_ROOT="${LSTORE_ROOT:-$work/store}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "start the distribution registry on loopback"
"$python" -m lstore.tools.registry --data "$work/registry" > "$work/registry.out" &
registry_pid=$!
cleanup() {
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
    [[ -s "$work/registry.out" ]] && break
    sleep 0.1
done
host="$(head -n1 "$work/registry.out")"
echo "registry at $host"

step "build images from Debian packages (cached after the first run) and push them"
"$python" -m lstore.tools.images --registry "$host"

step "pull"
show lstore pull "$host/busybox:latest"
show lstore pull "$host/debian-nginx:oci" "$host/debian-nginx:zstd"
show lstore pull "$host/debian-nginx:oci"
show lstore images

step "look inside the Debian image through a read-only overlay mount"
mkdir -p "$work/rootfs"
show lstore mount "$host/debian-nginx:oci" "$work/rootfs"
show cat "$work/rootfs/etc/os-release"
show cat "$work/rootfs/var/www/html/index.html"
show lstore umount "$work/rootfs"

if lstore run --help >/dev/null 2>&1; then
    step "run busybox"
    show lstore run --rm "$host/busybox:latest" sh -c 'echo "hello from $(hostname), pid $$"'

    step "run nginx detached with a published port"
    # The image's nginx logs to files; send its error log to stderr so `logs` shows it.
    id="$(lstore run -d --name web -p 127.0.0.1:18080:80 "$host/debian-nginx:oci" \
        nginx -g 'daemon off; error_log /dev/stderr notice;')"
    echo "$id"
    for _ in $(seq 50); do
        curl -fsS http://127.0.0.1:18080/ >/dev/null 2>&1 && break
        sleep 0.1
    done
    show curl -sS http://127.0.0.1:18080/
    show lstore ps
    show lstore logs web
    show lstore stop web
    show lstore rm web
fi

step "disk usage"
show lstore df
