"""Flow control for delivery: the rate budget seam a lane is handed and its local backend
(`budget`), the per-account rate limiter, concurrency controller and breaker (`limiter`), and
the rate windows they learn from the remote's headers.
"""
