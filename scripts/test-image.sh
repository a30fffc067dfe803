#!/usr/bin/env bash
# The image the role tests run systemd in: a Debian root filesystem made with debootstrap (no registry is
# needed), imported into podman as llmfleet-test-debian:bookworm. Built once, then reused; set
# LLMFLEET_TEST_IMAGE_REBUILD=1 to build it again. An image made with another package list (its label
# llmfleet.packages) is built again: nothing inside the container can reach a package index, so the roles
# find there only what is installed here (acl: the agent role's become_user steps).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/tests/containers/containers.conf"
image=${LLMFLEET_TEST_IMAGE:-llmfleet-test-debian:bookworm}
packages=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,openssl,procps,iproute2,sudo,curl,acl
if [ -z "${LLMFLEET_TEST_IMAGE_REBUILD:-}" ] && podman image exists "$image"; then
  built_with=$(podman image inspect --format '{{ index .Labels "llmfleet.packages" }}' "$image" 2>/dev/null || true)
  if [ "$built_with" = "$packages" ]; then
    echo "test image $image: present"
    exit 0
  fi
  echo "test image $image: made with other packages (${built_with:-unknown}); building it again"
fi
# the Debian mirror this machine's apt already uses
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n 1)
[ -n "$mirror" ] || mirror=$(awk '/^deb / && !/security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "test-image: no Debian mirror found in apt's sources" >&2; exit 1; }
root=$(mktemp -d /tmp/llmfleet-rootfs-XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "==> debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase \
  --include="$packages" \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# no getty on a container's console; a machine id per container
rm -f "$root/etc/machine-id" && touch "$root/etc/machine-id"
echo "==> importing it as $image"
tar -C "$root" -c . | podman import --change 'CMD=["/sbin/init"]' --change 'STOPSIGNAL=SIGRTMIN+3' \
  --change "LABEL llmfleet.packages=$packages" - "$image" >/dev/null
echo "test image $image: built"
