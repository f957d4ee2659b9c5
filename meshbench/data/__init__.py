"""Generated data sets of the benchmarks, with the code that generates them."""
