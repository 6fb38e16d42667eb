"""data.loader=ffcv: .beton files written by `reproduce prepare` (prepare.py), read by loaders.py."""
