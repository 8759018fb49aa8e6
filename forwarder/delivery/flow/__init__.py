"""Flow control for delivery: the per-account rate limiter, concurrency controller and
breaker (`limiter`), and the rate windows they learn from the remote's headers.
"""
