"""The delivery stage: the dispatcher and its per-account lanes, the retry policy, the
remote API client and dead letters. Flow control (rate budget, concurrency) is in `flow/`.
"""
