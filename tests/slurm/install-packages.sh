#!/usr/bin/env bash
# Install the Debian packages that tests/slurm/start-cluster.sh needs for a real
# one-node Slurm cluster with accounting (slurmdbd + MariaDB):
#   slurmctld slurmd slurm-client slurmdbd munge mariadb-server
# Debian 12 gives Slurm 22.05.8, munge 0.5.15, MariaDB 10.11.
#
# Non-interactive. `apt-get update` failing is tolerated when the cached package
# lists are enough. Package maintainer scripts are prevented from starting
# services (policy-rc.d exit 101); start-cluster.sh starts everything itself.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Already installed? Then there is nothing to do.
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-packages: all of ${PKGS[*]} already installed"
    exit 0
fi
echo "install-packages: installing ${missing[*]}"

# Keep maintainer scripts from starting daemons (as in Docker images); only add the
# policy file if there is none, and remove it again afterwards.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT

if ! $SUDO apt-get update -q; then
    echo "install-packages: apt-get update failed; trying with the cached package lists" >&2
fi

$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"

echo "install-packages: done"
