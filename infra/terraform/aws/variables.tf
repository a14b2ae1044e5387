# Inputs of the Kiln module. Every variable is described in README.md beside this file.

variable "name" {
  description = "Name prefix of every resource, and the CloudWatch namespace suffix (Kiln/<name>)."
  type        = string
  default     = "kiln"
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

# -- network ------------------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC to deploy into."
  type        = string
}

variable "public_subnet_ids" {
  description = "Subnets of the internet-facing load balancer (two or more availability zones)."
  type        = list(string)
}

variable "private_subnet_ids" {
  description = "Subnets of the API tasks, the workers, the janitor function and the database; they need outbound internet (NAT) to reach the Go module proxy and AWS APIs."
  type        = list(string)
}

variable "allowed_cidrs" {
  description = "Client address ranges allowed to reach the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "certificate_arn" {
  description = "ACM certificate of the HTTPS listener; empty: HTTP only (port 80)."
  type        = string
  default     = ""
}

variable "public_url" {
  description = "URL clients reach Kiln at (api.public_url); empty: http(s)://<load balancer DNS name>."
  type        = string
  default     = ""
}

# -- images and code ----------------------------------------------------------------------

variable "api_image" {
  description = "The kiln-api image (worker_image/api.Dockerfile) in a registry the tasks can pull, e.g. an ECR repository URL with a tag."
  type        = string
}

variable "worker_image" {
  description = "The kiln-worker image (worker_image/worker.Dockerfile)."
  type        = string
}

variable "sandbox_image" {
  description = "The Go build sandbox image (worker_image/sandbox.Dockerfile) the workers start for each build step (build.docker.image)."
  type        = string
}

variable "lambda_package" {
  description = "Path of the function zip built by infra/lambda/package.sh (janitor, and the API when api_on_lambda is true)."
  type        = string
}

# -- database -----------------------------------------------------------------------------

variable "db_instance_class" {
  description = "RDS instance class. Connections: each API task holds up to database.pool_max plus one listener; each worker concurrency + 3."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_storage" {
  description = "RDS storage, GiB (the queue is small: build rows, logs, attempts)."
  type        = number
  default     = 20
}

variable "db_engine_version" {
  description = "PostgreSQL major version of RDS."
  type        = string
  default     = "16"
}

variable "db_multi_az" {
  description = "Run RDS in two availability zones (failover in a minute or two; held requests reconnect)."
  type        = bool
  default     = true
}

variable "db_deletion_protection" {
  description = "Refuse to delete the database (turn off before terraform destroy)."
  type        = bool
  default     = true
}

# -- artifacts ----------------------------------------------------------------------------

variable "bucket_name" {
  description = "S3 bucket of the artifacts; empty: <name>-artifacts-<account id>."
  type        = string
  default     = ""
}

variable "artifact_retention_days" {
  description = "Days an artifact is kept after its last download (janitor.artifact_retention; the janitor deletes, so last use counts). 0: forever."
  type        = number
  default     = 30
}

variable "artifact_tiering_days" {
  description = "Days after which artifacts move to S3 Intelligent-Tiering (cheaper when rarely downloaded, served as fast). 0: never."
  type        = number
  default     = 30
}

variable "presign_seconds" {
  description = "Lifetime of presigned download URLs (storage.s3.presign_seconds)."
  type        = number
  default     = 900
}

# -- API ----------------------------------------------------------------------------------

variable "api_cpu" {
  description = "CPU units of one API task (1024 = one vCPU)."
  type        = number
  default     = 512
}

variable "api_memory" {
  description = "Memory of one API task, MiB."
  type        = number
  default     = 1024
}

variable "api_min_tasks" {
  description = "Fewest API tasks."
  type        = number
  default     = 2
}

variable "api_max_tasks" {
  description = "Most API tasks (scaled on CPU)."
  type        = number
  default     = 10
}

variable "api_threads" {
  description = "gunicorn threads per API process (api.threads): each held download takes one."
  type        = number
  default     = 64
}

variable "max_wait" {
  description = "Seconds /api/download holds a request while its build runs (api.max_wait); the load balancer's idle timeout is set above it."
  type        = number
  default     = 1800
}

variable "api_on_lambda" {
  description = "Also serve the API from a Lambda function behind an API Gateway HTTP API (29 s limit: held downloads use redirect-and-wait)."
  type        = bool
  default     = false
}

# -- workers ------------------------------------------------------------------------------

variable "worker_instance_types" {
  description = "Instance types the spot worker group may use (mixed instances; more types, fewer interruptions)."
  type        = list(string)
  default     = ["c7i.large", "c6i.large", "c6a.large", "c7a.large", "m7i.large", "m6i.large"]
}

variable "worker_on_demand_base" {
  description = "Workers that are always on-demand, not spot."
  type        = number
  default     = 0
}

variable "worker_min" {
  description = "Fewest workers (0 scales to zero when idle: the first build then waits for an instance to boot, keep api.worker_wait above that)."
  type        = number
  default     = 1
}

variable "worker_max" {
  description = "Most workers."
  type        = number
  default     = 20
}

variable "worker_concurrency" {
  description = "Builds one worker runs at once (worker.concurrency); about one per 2 vCPU and 2 GiB."
  type        = number
  default     = 1
}

variable "worker_volume_size" {
  description = "Root volume of a worker, GiB (Go module and build caches, images)."
  type        = number
  default     = 60
}

variable "lease_seconds" {
  description = "Seconds a claimed build stays leased without a heartbeat (worker.lease_seconds): how soon a vanished worker's build is retried."
  type        = number
  default     = 60
}

variable "scale_out_queue_depth" {
  description = "Queued builds (QueuedBuilds) above which one more worker is added per minute; twice it adds two, five times it adds five."
  type        = number
  default     = 1
}

variable "scale_in_idle_minutes" {
  description = "Minutes with nothing queued or running before the workers go down to worker_min."
  type        = number
  default     = 15
}

# -- janitor ------------------------------------------------------------------------------

variable "janitor_schedule" {
  description = "EventBridge schedule of the janitor function (and so of the queue depth metric)."
  type        = string
  default     = "rate(1 minute)"
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the logs of the API, workers and functions."
  type        = number
  default     = 30
}

variable "signing_key" {
  description = "ed25519 private key that signs artifacts (signing.key), as the base64 of the raw 32 bytes (one line); empty: unsigned. Stored in Secrets Manager."
  type        = string
  default     = ""
  sensitive   = true

  validation {
    condition     = !strcontains(var.signing_key, "\n")
    error_message = "signing_key must be one line: the base64 of the raw 32-byte ed25519 key, not a PEM file."
  }
}

variable "extra_environment" {
  description = "More KILN_<SECTION>__<FIELD> settings for every component (see config.example.yml)."
  type        = map(string)
  default     = {}
}
