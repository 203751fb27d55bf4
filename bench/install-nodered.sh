#!/usr/bin/env bash
# Install the Node-RED baseline of the end-to-end benchmark (bench/nodered.py):
# Node-RED 4.x and node-red-contrib-influxdb, with npm, into bench/.node-red/
# (gitignored). Idempotent: does nothing when both packages are already there at the
# wanted versions; pass --force to reinstall.
#
#     bench/install-nodered.sh [--force]
#
# Needs node >= 18 and npm on $PATH, and access to the npm registry.
set -euo pipefail

NODE_RED_VERSION="${NODE_RED_VERSION:-4}"
INFLUXDB_NODE_VERSION="${INFLUXDB_NODE_VERSION:-0.7}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${here}/.node-red"

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help)
        sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--force]" >&2
        exit 2
        ;;
esac

for tool in node npm; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "error: ${tool} not found on PATH (Node.js >= 18 is needed)" >&2
        exit 1
    fi
done

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if ((node_major < 18)); then
    echo "error: Node-RED 4 needs Node.js >= 18, found $(node -v)" >&2
    exit 1
fi

# Version of an installed package, or nothing.
installed_version() {
    local manifest="${prefix}/node_modules/$1/package.json"
    if [[ -f "${manifest}" ]]; then
        node -p "require(process.argv[1]).version" "${manifest}"
    fi
}

# True when version $1 matches the prefix $2 ("4" matches 4.1.8, "0.7" matches 0.7.0).
matches() {
    [[ -n "$1" && ("$1" == "$2" || "$1" == "$2".*) ]]
}

red="$(installed_version node-red)"
influx="$(installed_version node-red-contrib-influxdb)"
if ((force == 0)) && matches "${red}" "${NODE_RED_VERSION}" &&
    matches "${influx}" "${INFLUXDB_NODE_VERSION}" &&
    [[ -x "${prefix}/node_modules/.bin/node-red" ]]; then
    echo "Node-RED ${red} and node-red-contrib-influxdb ${influx} already in ${prefix}"
    exit 0
fi

mkdir -p "${prefix}"
if [[ ! -f "${prefix}/package.json" ]]; then
    printf '{\n  "name": "factory-ingest-bench-nodered",\n  "private": true\n}\n' \
        >"${prefix}/package.json"
fi

echo "Installing node-red@${NODE_RED_VERSION} and" \
    "node-red-contrib-influxdb@${INFLUXDB_NODE_VERSION} into ${prefix}"
npm install --prefix "${prefix}" --no-audit --no-fund --omit=dev --save-exact \
    "node-red@${NODE_RED_VERSION}" \
    "node-red-contrib-influxdb@${INFLUXDB_NODE_VERSION}"

echo "Installed Node-RED $(installed_version node-red)" \
    "and node-red-contrib-influxdb $(installed_version node-red-contrib-influxdb)"
echo "Executable: ${prefix}/node_modules/.bin/node-red"
