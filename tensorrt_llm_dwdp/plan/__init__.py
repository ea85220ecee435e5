"""Planner: predicts whether DWDP pays off on a cluster and a traffic mix (``plan`` command).

A planner beside the runtime: it reads a model config, a system description and a traffic
description, and predicts DWDP / DEP / replicated context steps from measured operator costs.
It imports the layout arithmetic (``dwdp/layout.py``) and expert specs (``moe/specs.py``) from
the library and nothing from the runtime's device code.
"""
