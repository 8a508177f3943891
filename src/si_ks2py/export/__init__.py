"""Outputs of a sort: the Phy folder and the SpikeInterface sorting."""
