"""Launchers that run the Flower apps (`python -m simulations.run`) and their shared helpers."""
