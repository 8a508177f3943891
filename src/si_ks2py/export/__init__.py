"""Outputs of a sort: the Phy folder and the SpikeInterface sorting."""


def run_export(ctx):
    from .phy import write_phy

    write_phy(ctx)
