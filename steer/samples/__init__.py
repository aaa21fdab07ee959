"""Sample policies that steer demo loads; also the input of the golden tests."""
