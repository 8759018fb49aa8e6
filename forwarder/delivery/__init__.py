"""The delivery stage: the dispatcher (`dispatcher`) and its per-account lanes (`lane`), each
with its gates (`gates`: breaker, refused-key gate) and its outcome records (`outcomes`); the
retry policy, the remote API client and dead letters. Flow control (rate budget, concurrency)
is in `flow/`.
"""
