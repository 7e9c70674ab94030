#!/bin/sh
# MLflow tracking server. Everything comes from MLflow's own environment variables:
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET  (served through this server: clients need no keys)
#   MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  (MinIO; a task role on AWS)
#   MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_SERVER_ALLOWED_HOSTS
# MLFLOW_AUTH=true switches on basic authentication: users live in MLFLOW_AUTH_DATABASE_URI, the
# first admin comes from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, and users get
# MLFLOW_AUTH_DEFAULT_PERMISSION (READ) on what they did not create.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION}"
if [ "${MLFLOW_AUTH:-false}" = "true" ]; then
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD to switch on authentication}"
    : "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY to switch on authentication}"
    MLFLOW_AUTH_CONFIG_PATH="$(mktemp)"
    export MLFLOW_AUTH_CONFIG_PATH
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<CONFIG
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
CONFIG
    set -- --app-name basic-auth "$@"
fi
exec mlflow server "$@"
