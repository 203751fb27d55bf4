#!/usr/bin/env bash
# Add an MQTT login for a device to mosquitto/passwd, with a new random password that
# is printed once, here, and stored nowhere else in clear.
#
# The username is the device id; mosquitto/acl lets it publish only to
# factory/<site>/<line>/<device id>/telemetry and .../status.
#
# Usage: scripts/add-device.sh [--rotate] DEVICE_ID
#   --rotate   replace the password of a device that already has a login
# MOSQUITTO_PASSWD=local|docker|auto selects the tool (see scripts/lib-secrets.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib-secrets.sh
source "$REPO/scripts/lib-secrets.sh"

PASSWD_DIR="$REPO/mosquitto"
PASSWD_FILE="$PASSWD_DIR/passwd"

usage() {
    echo "usage: $(basename "$0") [--rotate] DEVICE_ID" >&2
    exit 2
}

rotate=""
device=""
while (($#)); do
    case "$1" in
        --rotate) rotate=1 ;;
        -h | --help) usage ;;
        -*) usage ;;
        *)
            [[ -z "$device" ]] || usage
            device="$1"
            ;;
    esac
    shift
done
[[ -n "$device" ]] || usage

# The identifier rule of the device contract (devices/contract.py).
[[ "$device" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] \
    || die "invalid device id '$device': 1 to 64 characters from A-Z a-z 0-9 _ . -"
for reserved in "${RESERVED_USERS[@]}"; do
    [[ "$device" != "$reserved" ]] || die "'$device' is a service login, not a device id"
done
[[ -f "$PASSWD_FILE" ]] || die "mosquitto/passwd does not exist: run scripts/init-secrets.sh first"

exists=""
if cut -d: -f1 "$PASSWD_FILE" | grep -q -x -F -- "$device"; then
    exists=1
fi
if [[ -n "$exists" && -z "$rotate" ]]; then
    die "device '$device' already has a login; use --rotate to give it a new password"
fi
if [[ -z "$exists" && -n "$rotate" ]]; then
    die "device '$device' has no login to rotate"
fi

password="$(random_secret)"
passwd_set "$PASSWD_DIR" passwd "$device" "$password"

echo "device login ${rotate:+(new password) }for $device, shown only this once:" >&2
printf 'username=%s\npassword=%s\n' "$device" "$password"
echo "it may publish to factory/<site>/<line>/$device/telemetry and .../status" >&2
echo "a running broker reads mosquitto/passwd again on SIGHUP: docker compose kill -s SIGHUP mosquitto" >&2
