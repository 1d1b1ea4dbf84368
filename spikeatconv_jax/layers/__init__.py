"""Stateless building blocks shared by the spiking core and the models."""
