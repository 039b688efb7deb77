def register_default_patterns():
    pass
