#!/bin/sh
# The MLflow server image's entrypoint. Commands:
#   (none), or options      the tracking server: mlflow server [OPTIONS]
#   db-upgrade              `mlflow db upgrade` on the backend store, then exit: run once before
#                           the server (ECS: a container the server depends on)
#   access                  `hm-mlflow access`: the client users and their grants, then exit
#   predictions-db          `hm-mlflow predictions-db init`: the prediction log's database, role
#                           and tables on the same PostgreSQL server, as its administrator
#                           (HM_PREDICTIONS_ADMIN_URI, default: the backend store's URI), then exit
#
# Everything else comes from MLflow's own environment variables:
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB, or its parts:
#                                 MLFLOW_DB_HOST, _PORT, _NAME, _USER, _PASSWORD (an ECS secret;
#                                 percent-encoded here) and _SSLMODE
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET[/PREFIX] (served through this server: clients need
#                                 no keys)
#   MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  (MinIO; a task role on AWS)
#   MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_UVICORN_OPTS
# MLFLOW_AUTH=true switches on basic authentication: users live in MLFLOW_AUTH_DATABASE_URI
# (default: the backend store), the first admin comes from MLFLOW_AUTH_ADMIN_USERNAME /
# MLFLOW_AUTH_ADMIN_PASSWORD, and users get MLFLOW_AUTH_DEFAULT_PERMISSION (NO_PERMISSIONS) on
# what they were not granted.
set -eu

if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ] && [ -n "${MLFLOW_DB_HOST:-}" ]; then
    MLFLOW_BACKEND_STORE_URI="$(python -c 'import os
from urllib.parse import quote
e = os.environ
uri = "postgresql+psycopg2://%s:%s@%s:%s/%s" % (
    quote(e["MLFLOW_DB_USER"], safe=""), quote(e["MLFLOW_DB_PASSWORD"], safe=""),
    e["MLFLOW_DB_HOST"], e.get("MLFLOW_DB_PORT", "5432"), e.get("MLFLOW_DB_NAME", "mlflow"))
mode = e.get("MLFLOW_DB_SSLMODE")
print(uri + ("?sslmode=" + mode if mode else ""))')"
    export MLFLOW_BACKEND_STORE_URI
fi

case "${1:-}" in
    db-upgrade)
        : "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI or MLFLOW_DB_HOST}"
        exec mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI" ;;
    predictions-db)
        admin="${HM_PREDICTIONS_ADMIN_URI:-${MLFLOW_BACKEND_STORE_URI:-}}"
        : "${admin:?set HM_PREDICTIONS_ADMIN_URI, MLFLOW_BACKEND_STORE_URI or MLFLOW_DB_HOST}"
        exec hm-mlflow predictions-db init --admin-uri "$admin" ;;
    access)
        if [ "${MLFLOW_AUTH:-true}" != "true" ]; then
            echo "MLflow authentication is off: no users to create."
            exit 0
        fi
        shift
        exec hm-mlflow access "$@" ;;
esac

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI or MLFLOW_DB_HOST}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION}"
if [ "${MLFLOW_AUTH:-false}" = "true" ]; then
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD to switch on authentication}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY to switch on authentication}"
    MLFLOW_AUTH_CONFIG_PATH="$(mktemp)"
    export MLFLOW_AUTH_CONFIG_PATH
    # configparser reads % as interpolation: a percent-encoded password needs %%.
    auth_db="$(printf '%s' "${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}" | sed 's/%/%%/g')"
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<CONFIG
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${auth_db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
CONFIG
    set -- --app-name basic-auth "$@"
fi
exec mlflow server "$@"
