"""lorakit-experiments: the experiments, demos and sweeps built on top of the lorakit library.

lorakit itself never imports this package; the ``lorakit demo``, ``lorakit compare`` and
``lorakit sweep`` commands reach it through the ``lorakit.commands`` entry-point group.
"""
