#!/bin/bash
# InfluxDB 2 init script for docker-compose.yml (mounted at /docker-entrypoint-initdb.d).
#
# The influxdb:2.x image runs it once, right after the initial setup (an empty data
# volume), with the influx CLI already pointed at the server and holding the operator
# token, and with DOCKER_INFLUXDB_INIT_ORG and DOCKER_INFLUXDB_INIT_BUCKET_ID exported.
# On later starts nothing here runs again.
#
# 1. DBRP mapping: InfluxQL (Grafana's data source) sees the bucket as database
#    "<bucket>" with retention policy "autogen".
# 2. A read-only 1.x-compatible login "grafana" for that bucket, so Grafana never holds
#    the operator token.
set -euo pipefail

: "${DOCKER_INFLUXDB_INIT_BUCKET_ID:?expected from the setup of the influxdb image}"
: "${DOCKER_INFLUXDB_INIT_ORG:?expected from the setup of the influxdb image}"
: "${DOCKER_INFLUXDB_INIT_BUCKET:?expected from the setup of the influxdb image}"
: "${GRAFANA_INFLUX_PASSWORD:?GRAFANA_INFLUX_PASSWORD is not set}"

influx v1 dbrp create \
    --org "$DOCKER_INFLUXDB_INIT_ORG" \
    --bucket-id "$DOCKER_INFLUXDB_INIT_BUCKET_ID" \
    --db "$DOCKER_INFLUXDB_INIT_BUCKET" \
    --rp autogen \
    --default

influx v1 auth create \
    --org "$DOCKER_INFLUXDB_INIT_ORG" \
    --username grafana \
    --password "$GRAFANA_INFLUX_PASSWORD" \
    --read-bucket "$DOCKER_INFLUXDB_INIT_BUCKET_ID" \
    > /dev/null

echo "10-influxql.sh: database $DOCKER_INFLUXDB_INIT_BUCKET (rp autogen) mapped, read-only login grafana created"
