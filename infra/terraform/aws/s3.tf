# The artifact bucket: content-addressed binaries under builds/, uploads in flight under .tmp/.

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_18:access logs need a bucket of their own; downloads are logged by the API, which presigns them
  #checkov:skip=CKV_AWS_21:objects are content-addressed and written once; old versions would only keep what the janitor deletes
  #checkov:skip=CKV_AWS_144:every artifact can be rebuilt from its key's inputs; a replica region is the operator's choice
  #checkov:skip=CKV_AWS_145:encrypted with SSE-S3 (AES256, below); a customer managed key (cost, key policy) is the operator's choice
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events: the database is the record of every build
  bucket = local.bucket
  tags   = var.tags
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  #checkov:skip=CKV_AWS_300:a false finding: the rule incomplete-multipart-uploads does it, but checkov reads only the dynamic rule when there is one
  bucket = aws_s3_bucket.artifacts.id

  # a worker killed mid-upload leaves a temporary object or an unfinished multipart upload
  rule {
    id     = "temporary-uploads"
    status = "Enabled"

    filter {
      prefix = ".tmp/"
    }

    expiration {
      days = 1
    }
  }

  rule {
    id     = "incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # deletion is the janitor's (by last download, janitor.artifact_retention): an object
  # removed here would leave a build pointing at nothing. Rarely fetched binaries move to a
  # cheaper tier instead, still served at once.
  dynamic "rule" {
    for_each = var.artifact_tiering_days > 0 ? [1] : []

    content {
      id     = "artifact-tiering"
      status = "Enabled"

      filter {
        prefix = "builds/"
      }

      transition {
        days          = var.artifact_tiering_days
        storage_class = "INTELLIGENT_TIERING"
      }
    }
  }
}
