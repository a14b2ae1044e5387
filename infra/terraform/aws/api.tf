# The API: gunicorn in ECS Fargate tasks behind an Application Load Balancer.

resource "aws_lb" "api" {
  #checkov:skip=CKV_AWS_150:the load balancer holds no state; deletion protection is on the database (db_deletion_protection)
  #checkov:skip=CKV_AWS_91:Kiln logs every request itself (JSON, in CloudWatch); ALB access logs need a bucket of their own
  #checkov:skip=CKV2_AWS_28:a WAF is the operator's choice (cost, rules); Kiln validates every request and rate limits nothing itself
  #checkov:skip=CKV2_AWS_20:with certificate_arn set the HTTP listener only redirects to HTTPS; without one there is no HTTPS to redirect to
  name               = var.name
  load_balancer_type = "application"
  internal           = false
  subnets            = var.public_subnet_ids
  security_groups    = [aws_security_group.alb.id]
  # a held /api/download sends nothing until its build is done: the idle timeout must
  # outlast api.max_wait (at most 4000 s)
  idle_timeout = min(var.max_wait + 60, 4000)
  # refuse requests with malformed headers instead of passing them to gunicorn
  drop_invalid_header_fields = true
  tags                       = var.tags
}

resource "aws_lb_target_group" "api" {
  #checkov:skip=CKV_AWS_378:TLS ends at the load balancer; the tasks are in private subnets, reachable only from its security group
  name        = "${var.name}-api"
  port        = 8234
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = var.vpc_id
  # a deregistered task finishes its held downloads first (gunicorn drains on SIGTERM)
  deregistration_delay = 60
  tags                 = var.tags

  health_check {
    path                = "/healthz"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "http" {
  #checkov:skip=CKV_AWS_2:with certificate_arn set this listener only redirects to HTTPS; without one (evaluation, or TLS ended in front) it serves HTTP
  #checkov:skip=CKV_AWS_103:with certificate_arn set this listener only redirects to HTTPS, whose listener takes TLS 1.2 or 1.3
  load_balancer_arn = aws_lb.api.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = var.certificate_arn != "" ? "redirect" : "forward"
    target_group_arn = var.certificate_arn != "" ? null : aws_lb_target_group.api.arn

    dynamic "redirect" {
      for_each = var.certificate_arn != "" ? [1] : []

      content {
        port        = "443"
        protocol    = "HTTPS"
        status_code = "HTTP_301"
      }
    }
  }
}

resource "aws_lb_listener" "https" {
  count             = var.certificate_arn != "" ? 1 : 0
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

resource "aws_ecs_cluster" "kiln" {
  name = var.name
  tags = var.tags

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

# what ECS itself needs to start a task: pull the image, read the secrets, write logs
resource "aws_iam_role" "api_execution" {
  name_prefix        = "${var.name}-api-exec-"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "api_execution" {
  role       = aws_iam_role.api_execution.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "api_execution_secrets" {
  role   = aws_iam_role.api_execution.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

data "aws_iam_policy_document" "read_secrets" {
  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.database_url.arn, aws_secretsmanager_secret.signing_key.arn]
  }
}

data "aws_iam_policy_document" "artifacts" {
  statement {
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.artifacts.arn}/*"]
  }

  statement {
    actions   = ["s3:ListBucket", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.artifacts.arn]
  }
}

# what Kiln's code does: read and presign artifacts
resource "aws_iam_role" "api_task" {
  name_prefix        = "${var.name}-api-task-"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy" "api_task_artifacts" {
  role   = aws_iam_role.api_task.id
  policy = data.aws_iam_policy_document.artifacts.json
}

resource "aws_ecs_task_definition" "api" {
  family                   = "${var.name}-api"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.api_cpu
  memory                   = var.api_memory
  execution_role_arn       = aws_iam_role.api_execution.arn
  task_role_arn            = aws_iam_role.api_task.arn
  tags                     = var.tags

  container_definitions = jsonencode([{
    name      = "api"
    image     = var.api_image
    essential = true
    portMappings = [{
      containerPort = 8234
      protocol      = "tcp"
    }]
    environment = [for key, value in merge(local.common_environment, {
      KILN_API__LISTEN    = "0.0.0.0:8234"
      KILN_API__PROCESSES = "2"
      KILN_API__THREADS   = tostring(var.api_threads)
      KILN_API__MAX_WAIT  = tostring(var.max_wait)
      # gunicorn keeps idle connections open longer than the load balancer does
      GUNICORN_CMD_ARGS = "--keep-alive ${min(var.max_wait + 60, 4000) + 5}"
    }) : { name = key, value = value }]
    secrets = [
      { name = "KILN_DATABASE__URL", valueFrom = aws_secretsmanager_secret.database_url.arn },
    ]
    healthCheck = {
      command     = ["CMD", "python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8234/healthz', timeout=4).status != 200)"]
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 20
    }
    stopTimeout = 30
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.kiln["api"].name
        awslogs-region        = data.aws_region.current.name
        awslogs-stream-prefix = "api"
      }
    }
  }])
}

resource "aws_ecs_service" "api" {
  name                               = "${var.name}-api"
  cluster                            = aws_ecs_cluster.kiln.id
  task_definition                    = aws_ecs_task_definition.api.arn
  desired_count                      = var.api_min_tasks
  launch_type                        = "FARGATE"
  health_check_grace_period_seconds  = 30
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  tags                               = var.tags

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.api.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "api"
    container_port   = 8234
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  lifecycle {
    # the autoscaler owns the task count
    ignore_changes = [desired_count]
  }

  depends_on = [aws_lb_listener.http]
}

resource "aws_appautoscaling_target" "api" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.kiln.name}/${aws_ecs_service.api.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.api_min_tasks
  max_capacity       = var.api_max_tasks
}

resource "aws_appautoscaling_policy" "api_cpu" {
  name               = "${var.name}-api-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.api.service_namespace
  resource_id        = aws_appautoscaling_target.api.resource_id
  scalable_dimension = aws_appautoscaling_target.api.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = 60
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}
