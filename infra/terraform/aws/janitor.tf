# The janitor: a Lambda function on an EventBridge schedule. Each run applies migrations,
# runs the due jobs (lease expiry, GC, pruning...) and publishes the queue depth the
# worker group scales on.

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "functions" {
  name_prefix        = "${var.name}-functions-"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "functions_vpc" {
  role       = aws_iam_role.functions.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

resource "aws_iam_role_policy" "functions_artifacts" {
  role   = aws_iam_role.functions.id
  policy = data.aws_iam_policy_document.artifacts.json
}

data "aws_iam_policy_document" "put_metrics" {
  statement {
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [local.namespace]
    }
  }
}

resource "aws_iam_role_policy" "functions_metrics" {
  role   = aws_iam_role.functions.id
  policy = data.aws_iam_policy_document.put_metrics.json
}

resource "aws_lambda_function" "janitor" {
  #checkov:skip=CKV_AWS_116:a failed run is not replayed on purpose: the next scheduled run does the same work
  #checkov:skip=CKV_AWS_272:the package is built by make lambda-package, not signed with AWS Signer
  #checkov:skip=CKV_AWS_173:the environment is encrypted at rest with the AWS managed key; a customer managed key is the operator's choice
  #checkov:skip=CKV_AWS_50:Kiln emits no X-Ray traces; its logs and CloudWatch metrics say what each run did
  function_name    = "${var.name}-janitor"
  role             = aws_iam_role.functions.arn
  runtime          = "python3.11"
  handler          = "functions.janitor.lambda_handler.handler"
  filename         = var.lambda_package
  source_code_hash = filebase64sha256(var.lambda_package)
  memory_size      = 512
  # a storage GC turn may take a while; the next scheduled run starts regardless
  timeout = 300
  # one janitor at a time is enough (several would be safe: jobs take advisory locks)
  reserved_concurrent_executions = 1
  tags                           = var.tags

  vpc_config {
    subnet_ids         = var.private_subnet_ids
    security_group_ids = [aws_security_group.worker.id]
  }

  environment {
    variables = merge(local.common_environment, {
      # a function's environment is encrypted at rest; the URL is also in Secrets Manager
      KILN_DATABASE__URL      = local.database_url
      KILN_DATABASE__POOL_MIN = "0"
    })
  }

  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.kiln["janitor"].name
  }
}

resource "aws_cloudwatch_event_rule" "janitor" {
  name                = "${var.name}-janitor"
  description         = "Run the Kiln janitor"
  schedule_expression = var.janitor_schedule
  tags                = var.tags
}

resource "aws_cloudwatch_event_target" "janitor" {
  rule = aws_cloudwatch_event_rule.janitor.name
  arn  = aws_lambda_function.janitor.arn

  retry_policy {
    maximum_retry_attempts       = 0
    maximum_event_age_in_seconds = 60
  }
}

resource "aws_lambda_permission" "janitor" {
  statement_id  = "AllowEventBridge"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.janitor.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.janitor.arn
}
