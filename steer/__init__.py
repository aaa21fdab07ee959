"""steer: traffic steering for L7 policy on Kubernetes nodes."""

__version__ = "0.1.0"
