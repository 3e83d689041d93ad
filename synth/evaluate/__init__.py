"""`evaluate`: show that a round made the model safer without making it useless (see report.py)."""
