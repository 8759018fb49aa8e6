"""The intake stage: the HTTP app apps POST events to (`app`, its shared `state`, the token in
`auth`, request `bodies`, a request's account in `routing`, the `answers`), the drop-in's
leniency, the connections (`connections`, `guard`, `runner`), rejections, and accounts (which
remote account an event is delivered under).
"""
