"""Drop-in modules with the constructor arguments and state-dict keys of their torch.nn twins."""
