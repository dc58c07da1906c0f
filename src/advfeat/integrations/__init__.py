"""Adapters to other training frameworks (each needs its optional extra).

``advfeat.integrations.lightning.MethodModule``: any advfeat method as a Lightning module.
"""
