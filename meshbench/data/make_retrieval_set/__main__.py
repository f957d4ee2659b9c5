"""``python -m meshbench.data.make_retrieval_set``: regenerate the data set."""

from meshbench.data.make_retrieval_set import main

main()
