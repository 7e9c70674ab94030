# Three image repositories, one per image the project builds (the Dockerfiles in mlflow/,
# webapp/ and model/). Tags are immutable: a deployed tag always means the same image.
# `hm-mlflow cloud push-images` prints the build and push commands.

locals {
  images = {
    mlflow = "mlflow/Dockerfile-mlflow"
    webapp = "webapp/Dockerfile-webapp"
    model  = "model/Dockerfile-model"
  }
  image_uri = { for key, repo in aws_ecr_repository.this : key => "${repo.repository_url}:${var.image_tag}" }
}

resource "aws_ecr_repository" "this" {
  for_each = local.images

  name                 = "${var.name}/${each.key}"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = !var.protect_data

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.main.arn
  }
}

resource "aws_ecr_lifecycle_policy" "this" {
  for_each = aws_ecr_repository.this

  repository = each.value.name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Untagged images (superseded layers of failed pushes) after 7 days"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = 7
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the 20 newest tagged images"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = 20
        }
        action = { type = "expire" }
      },
    ]
  })
}
