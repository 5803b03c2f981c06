"""Recipes: a method's whole job as ordered stages (``stages``), run by one runner (``runner``).

Nothing is imported here: methods import :mod:`~ovdlab.platform.recipes.stages` to
declare their recipes, and the runner imports the methods.
"""
