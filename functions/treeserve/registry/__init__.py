"""The model registry on S3: versions, the pointer, outcomes."""
