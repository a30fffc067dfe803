#!/usr/bin/env bash
# Installs the Debian packages that `make test` and `make demo` need, non-interactively, and only those
# that are missing (so a machine that has them all pays nothing). Needs root or sudo on Debian/Ubuntu;
# elsewhere it lists what is missing and leaves it to you.
set -euo pipefail

packages=(
  python3-venv   # `python3 -m venv` on a Debian python3
  curl           # the demo talks to the agent with it
  shellcheck     # ansible-test sanity checks the collection's shell scripts with it
  openssl        # tests make self-signed certificates
  podman         # role tests: systemd in a container (molecule)
  runc
  debootstrap    # the container's Debian root filesystem (scripts/test-image.sh)
  postgresql     # the shared store's tests and `make bench-store`: a real PostgreSQL server
  samba          # LDAP login tests: a real Active Directory domain controller (agent/tests/samba.py)
  samba-ad-dc    # ... its AD database modules (samba-dsdb-modules), not pulled in without recommends
  samba-ad-provision  # ... the schema and templates `samba-tool domain provision` needs
  ldb-tools      # ldbsearch: look into the test domain controller's database when a test fails
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: not a Debian system; please install: ${missing[*]}" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-system-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "==> installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
