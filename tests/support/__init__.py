"""What the tests share: model and data builders, the distributed harness, fault injection."""
