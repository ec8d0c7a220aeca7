"""dcdkernels benchmark suite (pytest-benchmark). See benchmarks/README.md."""
