"""Experiments that test the MixGen and style-randomization claims: recipes, runner, report (experiments/README.md)."""
