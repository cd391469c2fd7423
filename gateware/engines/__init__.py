"""Engines of the accelerator top: one component per group of commands.

Each engine implements the interface of :mod:`hbfp_hw.gateware.engine` (command in,
status out, buffer ports). :data:`hbfp_hw.gateware.top.ENGINES` maps every opcode of
:mod:`hbfp_hw.protocol` to the engine that executes it.
"""
