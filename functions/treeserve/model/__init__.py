"""The model: manifest, upload checks, the sandbox, the predictor."""
