"""data.loader=ffcv: .beton files written by `reproduce prepare` (prepare.py) and read by
loaders.py, each with a manifest whose format manifest.py writes and checks; the calls into
FFCV are pipeline.py's and decode.py's, imported on first use.

Importing this package imports neither FFCV nor its loaders."""

from __future__ import annotations


def load(needed_by: str = "data.loader=ffcv"):
    """reproduce.data.ffcv.loaders with FFCV imported (torch's thread count kept), or DataError
    saying how to install FFCV."""
    from reproduce.data.ffcv import loaders

    loaders.ffcv_library(needed_by)
    return loaders
