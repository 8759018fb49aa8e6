"""Flow control for delivery: the rate budget seam a lane is handed and its local backend
(`budget`), the per-account rate limiter (`ratelimit`), adaptive concurrency (`concurrency`), the
circuit breaker (`breaker`), and the rate window learnt from the remote's headers (`ratewindow`).
"""
