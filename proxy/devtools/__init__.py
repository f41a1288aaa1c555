"""For developers: the mock upstream, the demo, the load tester."""
