"""``python -m benchmarks.data.make_retrieval_set``: regenerate the data set."""

from benchmarks.data.make_retrieval_set import main

main()
