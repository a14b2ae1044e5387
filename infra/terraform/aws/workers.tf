# Build workers: spot instances of several types in one Auto Scaling group, each running
# the kiln-worker container against its own Docker Engine. Scaled on QueuedBuilds, which
# the janitor function publishes every run (janitor.cloudwatch_namespace).

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  name_prefix        = "${var.name}-worker-"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy" "worker_artifacts" {
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.artifacts.json
}

resource "aws_iam_role_policy" "worker_secrets" {
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

resource "aws_iam_role_policy_attachment" "worker_ecr" {
  role       = aws_iam_role.worker.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly"
}

# Session Manager instead of SSH
resource "aws_iam_role_policy_attachment" "worker_ssm" {
  role       = aws_iam_role.worker.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_role_policy_attachment" "worker_logs" {
  role       = aws_iam_role.worker.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/CloudWatchAgentServerPolicy"
}

resource "aws_iam_instance_profile" "worker" {
  name_prefix = "${var.name}-worker-"
  role        = aws_iam_role.worker.name
  tags        = var.tags
}

resource "aws_launch_template" "worker" {
  name_prefix            = "${var.name}-worker-"
  image_id               = data.aws_ssm_parameter.al2023.value
  vpc_security_group_ids = [aws_security_group.worker.id]
  update_default_version = true
  tags                   = var.tags

  iam_instance_profile {
    arn = aws_iam_instance_profile.worker.arn
  }

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_size           = var.worker_volume_size
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
    # 1: the worker runs with --network host; the sandbox containers (a bridge network,
    # one hop further) must not reach the instance's credentials
    http_put_response_hop_limit = 1
  }

  user_data = base64encode(templatefile("${path.module}/templates/worker-user-data.sh.tftpl", {
    region              = data.aws_region.current.name
    worker_image        = var.worker_image
    sandbox_image       = var.sandbox_image
    database_secret_arn = aws_secretsmanager_secret.database_url.arn
    signing_secret_arn  = aws_secretsmanager_secret.signing_key.arn
    log_group           = aws_cloudwatch_log_group.kiln["worker"].name
    environment = merge(local.common_environment, {
      KILN_BUILD__SANDBOX                = "docker"
      KILN_BUILD__DOCKER__IMAGE          = var.sandbox_image
      KILN_BUILD__CACHE_DIR              = "/var/lib/kiln/cache"
      KILN_BUILD__WORK_DIR               = "/var/lib/kiln/work"
      KILN_WORKER__CONCURRENCY           = tostring(var.worker_concurrency)
      KILN_WORKER__PREEMPTION__PROVIDERS = "[aws]"
      KILN_WORKER__WARM_UP               = "5"
    })
  }))

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-worker" })
  }
}

resource "aws_autoscaling_group" "workers" {
  name_prefix         = "${var.name}-workers-"
  vpc_zone_identifier = var.private_subnet_ids
  min_size            = var.worker_min
  max_size            = var.worker_max
  # a replacement is launched when AWS warns that a spot instance is at risk, before the
  # two-minute interruption notice; the worker drains on that notice
  capacity_rebalance        = true
  default_instance_warmup   = 120
  health_check_type         = "EC2"
  health_check_grace_period = 300
  enabled_metrics           = ["GroupInServiceInstances", "GroupDesiredCapacity", "GroupPendingInstances"]

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = var.worker_on_demand_base
      on_demand_percentage_above_base_capacity = 0
      spot_allocation_strategy                 = "price-capacity-optimized"
    }

    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.worker.id
        version            = "$Latest"
      }

      dynamic "override" {
        for_each = var.worker_instance_types

        content {
          instance_type = override.value
        }
      }
    }
  }

  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = 50
    }
  }

  dynamic "tag" {
    for_each = merge(var.tags, { Name = "${var.name}-worker" })

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    # the scaling policies own the desired capacity
    ignore_changes = [desired_capacity]
  }
}

# -- scaling on queue depth ---------------------------------------------------------------

resource "aws_autoscaling_policy" "workers_out" {
  name                      = "${var.name}-workers-out"
  autoscaling_group_name    = aws_autoscaling_group.workers.name
  policy_type               = "StepScaling"
  adjustment_type           = "ChangeInCapacity"
  metric_aggregation_type   = "Maximum"
  estimated_instance_warmup = 120

  # bounds are relative to the alarm threshold (scale_out_queue_depth)
  step_adjustment {
    metric_interval_lower_bound = 0
    metric_interval_upper_bound = var.scale_out_queue_depth
    scaling_adjustment          = 1
  }

  step_adjustment {
    metric_interval_lower_bound = var.scale_out_queue_depth
    metric_interval_upper_bound = var.scale_out_queue_depth * 4
    scaling_adjustment          = 2
  }

  step_adjustment {
    metric_interval_lower_bound = var.scale_out_queue_depth * 4
    scaling_adjustment          = 5
  }
}

resource "aws_cloudwatch_metric_alarm" "queue_backlog" {
  alarm_name          = "${var.name}-queue-backlog"
  alarm_description   = "Builds are waiting for a worker: add workers."
  namespace           = local.namespace
  metric_name         = "QueuedBuilds"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 1
  threshold           = var.scale_out_queue_depth
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_autoscaling_policy.workers_out.arn]
  tags                = var.tags
}

resource "aws_autoscaling_policy" "workers_idle" {
  name                   = "${var.name}-workers-idle"
  autoscaling_group_name = aws_autoscaling_group.workers.name
  policy_type            = "SimpleScaling"
  adjustment_type        = "ExactCapacity"
  scaling_adjustment     = var.worker_min
  cooldown               = 300
}

# nothing queued and nothing running for a while: only then go down, so that scaling in
# never cuts a running build short
resource "aws_cloudwatch_metric_alarm" "queue_idle" {
  alarm_name          = "${var.name}-queue-idle"
  alarm_description   = "No build queued or running: back to the minimum of workers."
  evaluation_periods  = var.scale_in_idle_minutes
  threshold           = 0
  comparison_operator = "LessThanOrEqualToThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_autoscaling_policy.workers_idle.arn]
  tags                = var.tags

  metric_query {
    id          = "busy"
    expression  = "queued + running"
    label       = "Builds queued or running"
    return_data = true
  }

  metric_query {
    id = "queued"

    metric {
      namespace   = local.namespace
      metric_name = "QueuedBuilds"
      period      = 60
      stat        = "Maximum"
    }
  }

  metric_query {
    id = "running"

    metric {
      namespace   = local.namespace
      metric_name = "RunningBuilds"
      period      = 60
      stat        = "Maximum"
    }
  }
}
