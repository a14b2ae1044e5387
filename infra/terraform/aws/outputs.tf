output "api_url" {
  description = "URL of the API behind the load balancer (point clients and api.public_url here, or at your DNS name for it)."
  value       = local.public_url
}

output "load_balancer_dns_name" {
  description = "DNS name of the load balancer, for a CNAME or alias record."
  value       = aws_lb.api.dns_name
}

output "api_function_url" {
  description = "URL of the API Gateway in front of the API function; empty unless api_on_lambda."
  value       = var.api_on_lambda ? aws_apigatewayv2_stage.api[0].invoke_url : ""
}

output "bucket" {
  description = "S3 bucket of the artifacts (storage.s3.bucket)."
  value       = aws_s3_bucket.artifacts.bucket
}

output "database_endpoint" {
  description = "host:port of the RDS PostgreSQL instance."
  value       = aws_db_instance.kiln.endpoint
}

output "database_url_secret_arn" {
  description = "Secrets Manager secret holding KILN_DATABASE__URL (for `kiln migrate` or psql from a bastion)."
  value       = aws_secretsmanager_secret.database_url.arn
}

output "ecs_cluster" {
  description = "ECS cluster of the API service."
  value       = aws_ecs_cluster.kiln.name
}

output "worker_autoscaling_group" {
  description = "Auto Scaling group of the spot workers."
  value       = aws_autoscaling_group.workers.name
}

output "janitor_function" {
  description = "Name of the janitor Lambda function."
  value       = aws_lambda_function.janitor.function_name
}

output "metrics_namespace" {
  description = "CloudWatch namespace of QueuedBuilds, RunningBuilds and WorkerSlots (janitor.cloudwatch_namespace)."
  value       = local.namespace
}
