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
}

resource "aws_db_instance" "kiln" {
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
  auto_minor_version_upgrade   = true
  apply_immediately            = false
  tags                         = var.tags
}

locals {
  database_url = "postgresql://kiln:${random_password.db.result}@${aws_db_instance.kiln.address}:${aws_db_instance.kiln.port}/kiln?sslmode=require"
}
