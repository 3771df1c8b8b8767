"""Stand-in for the ``thop`` FLOP counter: CAN's ``models/densenet.py`` imports ``thop.profile`` at module level but
never calls it, so an import that works is all the official model files need."""


def profile(*args, **kwargs):
    raise NotImplementedError("thop stand-in: profile() is not available")
