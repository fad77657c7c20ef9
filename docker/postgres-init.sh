#!/usr/bin/env bash
# Creates MLflow's database beside prunelab's (POSTGRES_DB) on the first start of the volume.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${MLFLOW_DB:-mlflow}\" OWNER \"$POSTGRES_USER\""
