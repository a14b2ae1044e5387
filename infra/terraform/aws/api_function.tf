# Optional: the API as a Lambda function behind an API Gateway HTTP API (api_on_lambda).
# API Gateway ends a request after 29 s, so held downloads wait 25 s at a time and send the
# client round again with 307 (api.wait_redirects; Go's client follows 9: ~4 minutes).

resource "aws_lambda_function" "api" {
  count            = var.api_on_lambda ? 1 : 0
  function_name    = "${var.name}-api"
  role             = aws_iam_role.functions.arn
  runtime          = "python3.11"
  handler          = "functions.api.lambda_handler.handler"
  filename         = var.lambda_package
  source_code_hash = filebase64sha256(var.lambda_package)
  memory_size      = 1024
  timeout          = 29
  tags             = var.tags

  vpc_config {
    subnet_ids         = var.private_subnet_ids
    security_group_ids = [aws_security_group.api.id]
  }

  environment {
    variables = merge(local.common_environment, {
      KILN_DATABASE__URL = local.database_url
      # one request per instance at a time: a small pool, no idle connections kept
      KILN_DATABASE__POOL_MIN  = "0"
      KILN_DATABASE__POOL_MAX  = "2"
      KILN_API__MAX_WAIT       = "25"
      KILN_API__WAIT_REDIRECTS = "9"
      KILN_API__PUBLIC_URL     = var.public_url
    })
  }

  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.kiln["api-function"].name
  }
}

resource "aws_apigatewayv2_api" "api" {
  count         = var.api_on_lambda ? 1 : 0
  name          = "${var.name}-api"
  protocol_type = "HTTP"
  tags          = var.tags
}

resource "aws_apigatewayv2_integration" "api" {
  count                  = var.api_on_lambda ? 1 : 0
  api_id                 = aws_apigatewayv2_api.api[0].id
  integration_type       = "AWS_PROXY"
  integration_uri        = aws_lambda_function.api[0].invoke_arn
  payload_format_version = "2.0"
  timeout_milliseconds   = 30000
}

resource "aws_apigatewayv2_route" "api" {
  count     = var.api_on_lambda ? 1 : 0
  api_id    = aws_apigatewayv2_api.api[0].id
  route_key = "$default"
  target    = "integrations/${aws_apigatewayv2_integration.api[0].id}"
}

resource "aws_apigatewayv2_stage" "api" {
  count       = var.api_on_lambda ? 1 : 0
  api_id      = aws_apigatewayv2_api.api[0].id
  name        = "$default"
  auto_deploy = true
  tags        = var.tags
}

resource "aws_lambda_permission" "api" {
  count         = var.api_on_lambda ? 1 : 0
  statement_id  = "AllowApiGateway"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.api[0].function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.api[0].execution_arn}/*/*"
}
