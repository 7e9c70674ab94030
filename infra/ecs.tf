# ECS on Fargate: cluster NAME-cluster, services NAME-mlflow-service and NAME-webapp-service, and
# the task definition NAME-model-training that `aws ecs run-task` (or `hm-mlflow cloud retrain`)
# starts. All three run the project's own images and commands, as docker-compose.yaml does.
#
#   MLflow task   db-upgrade  `mlflow db upgrade` once, before the server (exits)
#                 mlflow      the tracking server, registry and artifact proxy
#                 access      with authentication: creates the client users and their grants (exits)
#   webapp task   webapp      `hm-mlflow serve`: follows the Production alias by itself, so a
#                             retraining that promotes a version needs no redeployment; records
#                             every answer in the prediction log (RDS, database `predictions`)
#                             and keeps each film under s3://DATA_BUCKET/feedback/
#                 predictions-db  the prediction log's role, database and tables (exits)
#   training      model-training  `hm-mlflow train` on the data bucket, then exits
#   monitor       monitor     `hm-mlflow monitor --retrain-on-drift`, daily (monitor.tf), then
#                             exits; starts the training task when a site drifts
#
# Clients reach MLflow at http://mlflow.DOMAIN through the internal load balancer; MLflow's
# allowed hosts list exactly the names it is reached by. Both servers keep idle connections 75 s,
# longer than the load balancers' 60 s idle timeout (alb.tf).

locals {
  cluster_name       = "${var.name}-cluster"
  training_family    = "${var.name}-model-training"
  training_container = "model-training"
  keep_alive_seconds = local.idle_timeout_seconds + 15

  mlflow_allowed_hosts = join(",", [
    local.mlflow_host, "${local.mlflow_host}:*", # through either load balancer
    "localhost:*", "127.0.0.1:*",                # the access step, inside the task
  ])

  # Settings every client of MLflow shares (webapp, training task).
  mlflow_client_env = [
    { name = "MLFLOW_TRACKING_URI", value = local.mlflow_internal_url },
    { name = "HM_MODEL_NAME", value = var.model_name },
    { name = "HM_EXPERIMENT", value = var.experiment },
    { name = "AWS_DEFAULT_REGION", value = local.region },
  ]
  # With authentication, each client signs in as its own user; the password is an ECS secret.
  mlflow_client_user = {
    for user in ["webapp", "trainer"] : user => var.mlflow_auth ? {
      environment = [{ name = "MLFLOW_TRACKING_USERNAME", value = user }]
      secrets     = [{ name = "MLFLOW_TRACKING_PASSWORD", valueFrom = aws_secretsmanager_secret.mlflow[user].arn }]
    } : { environment = [], secrets = [] }
  }

  # Every task runs on x86-64; images are built for it wherever they are built (an ARM laptop's
  # default would not start here): `hm-mlflow cloud push-images` reads image_platform.
  cpu_architecture = "X86_64"
  image_platform   = { X86_64 = "linux/amd64", ARM64 = "linux/arm64" }[local.cpu_architecture]

  # Read-only root filesystems; /tmp is a task volume (uploads, model downloads, plots): a bind
  # mount, which Fargate makes root's with mode 0755 unless the image declares the path a
  # VOLUME, as the three images do (their /tmp, mode 1777, is copied in).
  tmp_volume = "tmp"
  container_defaults = {
    readonlyRootFilesystem = true
    mountPoints            = [{ sourceVolume = local.tmp_volume, containerPath = "/tmp", readOnly = false }]
  }

  mlflow_server_env = [
    { name = "MLFLOW_DB_HOST", value = aws_db_instance.mlflow.address },
    { name = "MLFLOW_DB_PORT", value = tostring(aws_db_instance.mlflow.port) },
    { name = "MLFLOW_DB_NAME", value = aws_db_instance.mlflow.db_name },
    { name = "MLFLOW_DB_USER", value = aws_db_instance.mlflow.username },
    { name = "MLFLOW_DB_SSLMODE", value = "require" },
    { name = "MLFLOW_ARTIFACTS_DESTINATION", value = local.artifacts_destination },
    { name = "MLFLOW_SERVER_ALLOWED_HOSTS", value = local.mlflow_allowed_hosts },
    { name = "MLFLOW_UVICORN_OPTS", value = "--timeout-keep-alive ${local.keep_alive_seconds}" },
    { name = "MLFLOW_WORKERS", value = "2" },
    { name = "MLFLOW_AUTH", value = tostring(var.mlflow_auth) },
    { name = "MLFLOW_AUTH_DEFAULT_PERMISSION", value = "NO_PERMISSIONS" },
    { name = "AWS_DEFAULT_REGION", value = local.region },
  ]
  # The database password is Terraform's (secrets.tf). The admin password and the session key
  # are used only when authentication is on.
  db_password = {
    name      = "MLFLOW_DB_PASSWORD"
    valueFrom = aws_secretsmanager_secret.database.arn
  }
  mlflow_server_secrets = [
    local.db_password,
    { name = "MLFLOW_AUTH_ADMIN_PASSWORD", valueFrom = aws_secretsmanager_secret.mlflow["admin"].arn },
    { name = "MLFLOW_FLASK_SERVER_SECRET_KEY", valueFrom = aws_secretsmanager_secret.mlflow["flask-secret-key"].arn },
  ]

  # The prediction log: a database and role of their own on the RDS instance, made by the MLflow
  # task's predictions-db step; the password is Terraform's (secrets.tf), given as an ECS secret.
  prediction_log_env = [
    { name = "HM_PREDICTIONS_DB_HOST", value = aws_db_instance.mlflow.address },
    { name = "HM_PREDICTIONS_DB_PORT", value = tostring(aws_db_instance.mlflow.port) },
    { name = "HM_PREDICTIONS_DB_NAME", value = "predictions" },
    { name = "HM_PREDICTIONS_DB_USER", value = "predictions" },
    { name = "HM_PREDICTIONS_DB_SSLMODE", value = "require" },
  ]
  prediction_log_secret = {
    name      = "HM_PREDICTIONS_DB_PASSWORD"
    valueFrom = aws_secretsmanager_secret.predictions_db.arn
  }
  feedback_uri = "s3://${module.data_bucket.id}/${local.feedback_prefix}"

  log_configuration = {
    for key, group in local.log_groups : key => {
      logDriver = "awslogs"
      options = {
        awslogs-group         = group
        awslogs-region        = local.region
        awslogs-stream-prefix = "ecs"
      }
    }
  }

  health_check = {
    for key, service in local.services : key => {
      command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${service.port}${service.health_path}', timeout=4)"]
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 90
    }
  }

  mlflow_containers = concat(
    [
      merge(local.container_defaults, {
        name             = "db-upgrade"
        image            = local.image_uri["mlflow"]
        essential        = false
        command          = ["db-upgrade"]
        environment      = local.mlflow_server_env
        secrets          = [local.db_password]
        logConfiguration = local.log_configuration["mlflow"]
      }),
      merge(local.container_defaults, {
        name             = "predictions-db"
        image            = local.image_uri["mlflow"]
        essential        = false
        command          = ["predictions-db"]
        environment      = concat(local.mlflow_server_env, local.prediction_log_env)
        secrets          = [local.db_password, local.prediction_log_secret]
        logConfiguration = local.log_configuration["mlflow"]
      }),
      merge(local.container_defaults, {
        name             = "mlflow"
        image            = local.image_uri["mlflow"]
        essential        = true
        portMappings     = [{ containerPort = local.services.mlflow.port, protocol = "tcp" }]
        environment      = local.mlflow_server_env
        secrets          = local.mlflow_server_secrets
        healthCheck      = local.health_check["mlflow"]
        dependsOn        = [{ containerName = "db-upgrade", condition = "SUCCESS" }]
        logConfiguration = local.log_configuration["mlflow"]
      }),
    ],
    var.mlflow_auth ? [
      merge(local.container_defaults, {
        name      = "access"
        image     = local.image_uri["mlflow"]
        essential = false
        command   = ["access"]
        environment = [
          { name = "MLFLOW_TRACKING_URI", value = "http://127.0.0.1:${local.services.mlflow.port}" },
          { name = "MLFLOW_TRACKING_USERNAME", value = "admin" },
          { name = "HM_MODEL_NAME", value = var.model_name },
          { name = "HM_EXPERIMENT", value = var.experiment },
        ]
        secrets = [
          { name = "MLFLOW_TRACKING_PASSWORD", valueFrom = aws_secretsmanager_secret.mlflow["admin"].arn },
          { name = "HM_AUTH_WEBAPP_PASSWORD", valueFrom = aws_secretsmanager_secret.mlflow["webapp"].arn },
          { name = "HM_AUTH_TRAINER_PASSWORD", valueFrom = aws_secretsmanager_secret.mlflow["trainer"].arn },
          { name = "HM_AUTH_NOTEBOOK_PASSWORD", valueFrom = aws_secretsmanager_secret.mlflow["notebook"].arn },
        ]
        dependsOn        = [{ containerName = "mlflow", condition = "HEALTHY" }]
        logConfiguration = local.log_configuration["mlflow"]
      }),
    ] : [],
  )

  webapp_containers = [
    merge(local.container_defaults, {
      name         = "webapp"
      image        = local.image_uri["webapp"]
      essential    = true
      command      = ["hm-mlflow", "serve", "--host", "0.0.0.0", "--port", tostring(local.services.webapp.port)]
      portMappings = [{ containerPort = local.services.webapp.port, protocol = "tcp" }]
      environment = concat(local.mlflow_client_env, local.mlflow_client_user["webapp"].environment, [
        { name = "HM_REFRESH_SECONDS", value = tostring(var.refresh_seconds) },
        # The upload page's links to the run and the version: MLflow as a browser reaches it.
        { name = "HM_MLFLOW_UI_URL", value = "${local.public_scheme}://${local.mlflow_host}" },
        { name = "HM_KEEP_ALIVE_SECONDS", value = tostring(local.keep_alive_seconds) },
        # A fraction of a vCPU per task: one worker each, more tasks under load.
        { name = "HM_WEB_WORKERS", value = tostring(max(1, floor(var.webapp_cpu / 1024))) },
        # Films kept for the readers: the task role may write under this prefix only.
        { name = "HM_FEEDBACK_URI", value = local.feedback_uri },
      ], local.prediction_log_env)
      secrets          = concat(local.mlflow_client_user["webapp"].secrets, [local.prediction_log_secret])
      healthCheck      = local.health_check["webapp"]
      logConfiguration = local.log_configuration["webapp"]
    }),
  ]

  training_containers = [
    merge(local.container_defaults, {
      name      = local.training_container
      image     = local.image_uri["model"]
      essential = true
      command   = ["hm-mlflow", "train", "--data", local.data_root]
      environment = concat(local.mlflow_client_env, local.mlflow_client_user["trainer"].environment, [
        { name = "HM_DATA_DIR", value = local.data_root },
      ], local.prediction_log_env)
      secrets          = concat(local.mlflow_client_user["trainer"].secrets, [local.prediction_log_secret])
      logConfiguration = local.log_configuration["training"]
    }),
  ]

  # The monitor signs in to MLflow as the trainer (it logs runs and tags versions) and starts the
  # training task, which trains on the data bucket and the readers' films.
  monitor_containers = [
    merge(local.container_defaults, {
      name      = "monitor"
      image     = local.image_uri["model"]
      essential = true
      command   = ["hm-mlflow", "monitor", "--retrain-on-drift"]
      environment = concat(local.mlflow_client_env, local.mlflow_client_user["trainer"].environment, [
        { name = "HM_RETRAIN_TARGET", value = "ecs" },
        { name = "HM_RETRAIN_ECS_CLUSTER", value = local.cluster_name },
        { name = "HM_RETRAIN_ECS_TASK", value = local.training_family },
        { name = "HM_RETRAIN_ECS_CONTAINER", value = local.training_container },
        { name = "HM_RETRAIN_ECS_SUBNETS", value = join(",", aws_subnet.private[*].id) },
        { name = "HM_RETRAIN_ECS_SECURITY_GROUP", value = aws_security_group.this["training"].id },
      ], local.prediction_log_env)
      secrets          = concat(local.mlflow_client_user["trainer"].secrets, [local.prediction_log_secret])
      logConfiguration = local.log_configuration["monitor"]
    }),
  ]

  task_definitions = {
    mlflow   = { family = "${var.name}-mlflow", cpu = var.mlflow_cpu, memory = var.mlflow_memory, containers = local.mlflow_containers }
    webapp   = { family = "${var.name}-webapp", cpu = var.webapp_cpu, memory = var.webapp_memory, containers = local.webapp_containers }
    training = { family = local.training_family, cpu = var.training_cpu, memory = var.training_memory, containers = local.training_containers }
    monitor  = { family = "${var.name}-monitor", cpu = var.monitor_cpu, memory = var.monitor_memory, containers = local.monitor_containers }
  }
}

resource "aws_ecs_cluster" "main" {
  name = local.cluster_name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_cluster_capacity_providers" "main" {
  cluster_name       = aws_ecs_cluster.main.name
  capacity_providers = ["FARGATE"]

  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
  }
}

resource "aws_ecs_task_definition" "this" {
  for_each = local.task_definitions

  family                   = each.value.family
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.cpu
  memory                   = each.value.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task[each.key].arn
  container_definitions    = jsonencode(each.value.containers)

  volume {
    name = local.tmp_volume
  }

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = local.cpu_architecture
  }
}

resource "aws_ecs_service" "this" {
  for_each = local.services

  name            = "${var.name}-${each.key}-service"
  cluster         = aws_ecs_cluster.main.id
  task_definition = aws_ecs_task_definition.this[each.key].arn
  launch_type     = "FARGATE"
  desired_count   = each.key == "webapp" ? var.webapp_min_tasks : var.mlflow_desired_count

  health_check_grace_period_seconds = 120
  enable_ecs_managed_tags           = true
  propagate_tags                    = "SERVICE"

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.this[each.key].id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  # The autoscaler (below) owns the number of tasks once the service exists.
  lifecycle {
    ignore_changes = [desired_count]
  }

  depends_on = [aws_lb_listener_rule.host]

  # One registration per load balancer. Kept last: tfparse, which tests/test_infra_wiring.py
  # reads this with, loses a dynamic block that other blocks follow.
  dynamic "load_balancer" {
    for_each = local.service_targets[each.key]
    iterator = target
    content {
      target_group_arn = aws_lb_target_group.this[target.key].arn
      container_name   = each.key
      container_port   = each.value.port
    }
  }
}

# --- Task counts: the webapp follows its load, MLflow stays at var.mlflow_desired_count --------

locals {
  task_counts = {
    mlflow = { min = var.mlflow_desired_count, max = var.mlflow_desired_count }
    webapp = { min = var.webapp_min_tasks, max = var.webapp_max_tasks }
  }
}

resource "aws_appautoscaling_target" "service" {
  for_each = local.task_counts

  service_namespace  = "ecs"
  scalable_dimension = "ecs:service:DesiredCount"
  resource_id        = "service/${aws_ecs_cluster.main.name}/${aws_ecs_service.this[each.key].name}"
  min_capacity       = each.value.min
  max_capacity       = each.value.max
}

resource "aws_appautoscaling_policy" "webapp_requests" {
  name               = "${var.name}-webapp-requests-per-target"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.service["webapp"].service_namespace
  scalable_dimension = aws_appautoscaling_target.service["webapp"].scalable_dimension
  resource_id        = aws_appautoscaling_target.service["webapp"].resource_id

  target_tracking_scaling_policy_configuration {
    target_value       = var.webapp_requests_per_target
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = "${aws_lb.this["public"].arn_suffix}/${aws_lb_target_group.this["public-webapp"].arn_suffix}"
    }
  }
}
