"""Renderers: text (Terraform's shape), markdown (pull requests) and JSON, from the plan alone."""
