# Kiln on AWS: RDS PostgreSQL, an S3 bucket, the API on ECS Fargate behind an ALB (and
# optionally on Lambda), spot workers in an Auto Scaling group scaled on queue depth, and
# the janitor as a scheduled Lambda function. See README.md and docs/deploy.md.

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  namespace  = "Kiln/${var.name}"
  bucket     = var.bucket_name != "" ? var.bucket_name : "${var.name}-artifacts-${data.aws_caller_identity.current.account_id}"
  scheme     = var.certificate_arn != "" ? "https" : "http"
  public_url = var.public_url != "" ? var.public_url : "${local.scheme}://${aws_lb.api.dns_name}"

  # settings every component shares, as KILN_<SECTION>__<FIELD> (kiln/config.py)
  common_environment = merge({
    KILN_STORAGE__BACKEND              = "s3"
    KILN_STORAGE__SERVE                = "redirect"
    KILN_STORAGE__S3__BUCKET           = aws_s3_bucket.artifacts.bucket
    KILN_STORAGE__S3__REGION           = data.aws_region.current.name
    KILN_STORAGE__S3__PRESIGN_SECONDS  = tostring(var.presign_seconds)
    KILN_API__PUBLIC_URL               = local.public_url
    KILN_WORKER__LEASE_SECONDS         = tostring(var.lease_seconds)
    KILN_JANITOR__ARTIFACT_RETENTION   = tostring(var.artifact_retention_days * 86400)
    KILN_JANITOR__CLOUDWATCH_NAMESPACE = local.namespace
    KILN_JANITOR__PREBUILD__ENABLED    = "true"
    KILN_MODCACHE__ENABLED             = "true"
    KILN_BUILDCACHE__ENABLED           = "true"
    KILN_LOGGING__FORMAT               = "json"
  }, var.extra_environment)
}

# -- security groups ----------------------------------------------------------------------

resource "aws_security_group" "alb" {
  #checkov:skip=CKV_AWS_260:port 80 redirects to HTTPS when certificate_arn is set; allowed_cidrs narrows who reaches it
  #checkov:skip=CKV_AWS_382:the load balancer only reaches its targets; naming the API group here would make the two groups depend on each other
  name        = "${var.name}-alb"
  description = "Kiln load balancer"
  vpc_id      = var.vpc_id
  tags        = var.tags

  ingress {
    description = "HTTP"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = var.allowed_cidrs
  }

  ingress {
    description = "HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = var.allowed_cidrs
  }

  egress {
    description = "anywhere"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "api" {
  #checkov:skip=CKV_AWS_382:the API reaches RDS, S3, Secrets Manager and the Go module proxy (to resolve versions), some only by public name
  name        = "${var.name}-api"
  description = "Kiln API tasks and functions"
  vpc_id      = var.vpc_id
  tags        = var.tags

  ingress {
    description     = "from the load balancer"
    from_port       = 8234
    to_port         = 8234
    protocol        = "tcp"
    security_groups = [aws_security_group.alb.id]
  }

  egress {
    description = "anywhere"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "worker" {
  #checkov:skip=CKV_AWS_382:builds fetch modules from the configured Go module proxy and upload to S3; the proxy may be anywhere
  name        = "${var.name}-worker"
  description = "Kiln workers and the janitor function (outbound only)"
  vpc_id      = var.vpc_id
  tags        = var.tags

  egress {
    description = "anywhere"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "db" {
  name        = "${var.name}-db"
  description = "Kiln PostgreSQL"
  vpc_id      = var.vpc_id
  tags        = var.tags

  ingress {
    description     = "PostgreSQL from Kiln"
    from_port       = 5432
    to_port         = 5432
    protocol        = "tcp"
    security_groups = [aws_security_group.api.id, aws_security_group.worker.id]
  }
}

# -- secrets ------------------------------------------------------------------------------

resource "aws_secretsmanager_secret" "database_url" {
  #checkov:skip=CKV_AWS_149:encrypted with the AWS managed key; a customer managed key (cost, key policy) is the operator's choice
  #checkov:skip=CKV2_AWS_57:the password is random_password's, kept in this state; rotating it needs a rotation function that rewrites the whole URL
  name_prefix = "${var.name}-database-url-"
  description = "KILN_DATABASE__URL of Kiln"
  tags        = var.tags
}

resource "aws_secretsmanager_secret_version" "database_url" {
  secret_id     = aws_secretsmanager_secret.database_url.id
  secret_string = local.database_url
}

resource "aws_secretsmanager_secret" "signing_key" {
  #checkov:skip=CKV_AWS_149:encrypted with the AWS managed key; a customer managed key (cost, key policy) is the operator's choice
  #checkov:skip=CKV2_AWS_57:a new signing key invalidates every published signature: it is rotated deliberately, not on a timer
  name_prefix = "${var.name}-signing-key-"
  description = "KILN_SIGNING__KEY of Kiln (ed25519, empty: unsigned artifacts)"
  tags        = var.tags
}

resource "aws_secretsmanager_secret_version" "signing_key" {
  secret_id = aws_secretsmanager_secret.signing_key.id
  # Secrets Manager refuses an empty string; a blank line reads as "no key"
  secret_string = var.signing_key != "" ? var.signing_key : " "
}

resource "aws_cloudwatch_log_group" "kiln" {
  #checkov:skip=CKV_AWS_158:encrypted by CloudWatch Logs; a customer managed key (cost, key policy) is the operator's choice
  #checkov:skip=CKV_AWS_338:log_retention_days sets it; a build's own log is kept in PostgreSQL
  for_each          = toset(["api", "worker", "janitor", "api-function"])
  name              = "/kiln/${var.name}/${each.key}"
  retention_in_days = var.log_retention_days
  tags              = var.tags
}
