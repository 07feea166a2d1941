"""SSL building blocks (heads, losses, momentum encoders) and the papers' mechanisms; the view
operators they use live in the core (``cropbench.views``), the shared types in ``cropbench.types``.

Every module in this package is imported by ``cropbench.registry.load_plugins`` so that its
``@METHODS.register`` decorators run; nothing here keeps a hand-synced list of methods.
"""
