"""hm-mlflow: chest X-ray classification (NORMAL vs PNEUMONIA) on MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hm-mlflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

LABELS = ("NORMAL", "PNEUMONIA")
"""Class names, negative first: PNEUMONIA is the positive class everywhere."""
