"""The moderators' review console (``sieve console``): the human-review topic as a work queue.

Above the workers and the reviewer, below the command line: it reads the reviewer's
hand-offs, lets moderators claim and decide them in a browser, and publishes their
verdicts exactly as the reviewer publishes its own (verdict topics, labels topic).
"""
