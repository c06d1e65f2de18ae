"""Output formats, one module each, every one a pure function of a report; none re-runs a check.

Import from the modules (``bncheck.render.json``...): the text format pulls in rich, which the machine-readable
formats do not need to load.
"""
