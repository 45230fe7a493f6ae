"""What a user would deploy instead of a generative recommender, evaluated by the same code, split and metrics:
most popular items (`mostpop.py`) and SASRec (`sasrec.py`)."""
