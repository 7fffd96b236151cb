"""Real servers and helpers shared by the test layers, the demo and the benchmarks."""
