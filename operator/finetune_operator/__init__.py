"""FineTune operator (kopf)."""
