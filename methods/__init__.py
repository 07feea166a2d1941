"""SSL building blocks (views, heads, losses, momentum encoders) and the papers' mechanisms.

Every module in this package is imported by ``cropbench.registry.load_plugins`` so that its
``@METHODS.register`` decorators run; nothing here keeps a hand-synced list of methods.
"""
