"""`steer bench`: measured figures, never asserted in tests."""
