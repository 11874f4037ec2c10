"""Command-line tools: bench, info, demo, and the tiny-model builders the tests and demo use."""
