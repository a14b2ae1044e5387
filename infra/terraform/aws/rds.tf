# PostgreSQL: the queue, build state, logs and the shared metrics of every Kiln process.

resource "random_password" "db" {
  length  = 32
  special = false
}

resource "aws_db_subnet_group" "kiln" {
  name       = "${var.name}-db"
  subnet_ids = var.private_subnet_ids
  tags       = var.tags
}

resource "aws_db_parameter_group" "kiln" {
  name   = "${var.name}-pg${var.db_engine_version}"
  family = "postgres${var.db_engine_version}"
  tags   = var.tags

  # drop connections of clients that vanished without closing them (spot workers)
  parameter {
    name  = "tcp_keepalives_idle"
    value = "60"
  }

  parameter {
    name  = "idle_in_transaction_session_timeout"
    value = "60000"
  }

  # Kiln's URL asks for TLS (sslmode=require); the server refuses clients that do not
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
}

resource "aws_db_instance" "kiln" {
  #checkov:skip=CKV_AWS_161:Kiln connects with the password in its database URL (Secrets Manager), not with IAM tokens
  #checkov:skip=CKV_AWS_118:Performance Insights is on; enhanced (OS) monitoring needs a role of its own and is the operator's choice
  #checkov:skip=CKV_AWS_354:Performance Insights data is encrypted with the AWS managed key; a customer managed key is the operator's choice
  identifier                   = var.name
  engine                       = "postgres"
  engine_version               = var.db_engine_version
  instance_class               = var.db_instance_class
  allocated_storage            = var.db_allocated_storage
  max_allocated_storage        = var.db_allocated_storage * 5
  storage_type                 = "gp3"
  storage_encrypted            = true
  db_name                      = "kiln"
  username                     = "kiln"
  password                     = random_password.db.result
  port                         = 5432
  multi_az                     = var.db_multi_az
  db_subnet_group_name         = aws_db_subnet_group.kiln.name
  parameter_group_name         = aws_db_parameter_group.kiln.name
  vpc_security_group_ids       = [aws_security_group.db.id]
  publicly_accessible          = false
  backup_retention_period      = 7
  deletion_protection          = var.db_deletion_protection
  skip_final_snapshot          = false
  final_snapshot_identifier    = "${var.name}-final"
  performance_insights_enabled = true
  # slow queries and errors in CloudWatch, beside the logs of Kiln's own processes
  enabled_cloudwatch_logs_exports = ["postgresql"]
  copy_tags_to_snapshot           = true
  auto_minor_version_upgrade      = true
  apply_immediately               = false
  tags                            = var.tags
}

locals {
  database_url = "postgresql://kiln:${random_password.db.result}@${aws_db_instance.kiln.address}:${aws_db_instance.kiln.port}/kiln?sslmode=require"
}
