"""What the tests (and the benchmarks in bench/) run against, not tests themselves: the Slack and Socket Mode
stand-ins, a TCP proxy for network faults, tiny models and their fixtures, a classifier server for tests, and
waiting on a condition instead of sleeping."""
