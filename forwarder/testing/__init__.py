"""For tests and demos: the mock of the remote API (`forwarder mock-remote`) and
`forwarder demo`.
"""
