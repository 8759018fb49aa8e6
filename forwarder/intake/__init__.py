"""The intake stage: the HTTP app apps POST events to, request parsing and the drop-in's
leniency, connection deadlines, rejections, and accounts (which remote account an event is
delivered under).
"""
