"""Applications built on the library: the ``kvtier`` CLI, the demo and the benchmarks. The library never
imports this package."""
