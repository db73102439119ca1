"""Helpers shared by the test modules: the reference model, model settings, oracles, a test server.

Imported as `support.<module>` (pyproject's pytest `pythonpath = ["tests"]`); test modules never import
each other.
"""
