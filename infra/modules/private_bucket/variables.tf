variable "name" {
  description = "Bucket name (globally unique)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key that encrypts every object."
  type        = string
}

variable "force_destroy" {
  description = "Let terraform destroy delete a bucket that still holds objects."
  type        = bool
  default     = false
}

variable "noncurrent_days" {
  description = "Days an overwritten or deleted object's old version is kept."
  type        = number
  default     = 90
}
