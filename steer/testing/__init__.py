"""steer."""
