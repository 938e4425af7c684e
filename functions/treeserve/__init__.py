"""treeserve: put XGBoost models into production on AWS Lambda.

The domain library bundled into every function: registry, model package, predictor, input
parsing, capture, drift, settings. Nothing in here knows the shape of a Lambda event.
"""

__version__ = "0.1.0"
